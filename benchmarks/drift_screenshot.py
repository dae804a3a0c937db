"""Regenerate docs/img/drift-report.png: the HTML drift report of a realistic migration.

    python benchmarks/drift_screenshot.py                     # writes docs/img/drift-report.png
    python benchmarks/drift_screenshot.py --out /tmp/x.png --keep /tmp/drift   # keep the page and checkpoints
    python benchmarks/drift_screenshot.py --steps         # writes docs/img/drift-steps.png (two runs, 6 steps)

Writes a 12-layer llama-style model twice with flax + orbax: A as a Linen TrainState (scanned
layers), B as an NNX state (one array per layer) of the same weights after a "refactor" that
changed the order of a few float operations (relative noise of 1e-7 to 1e-6 per element, within
tolerance) and broke `self_attention/out` from layer 8 on (an offset growing with depth, beyond
tolerance). Then runs `ckptparity A B --html PAGE` and takes a full-page screenshot of PAGE in
headless Chromium (tests/browser.py). Needs chromium (apt-get install chromium).

With `--steps`: two training runs that checkpoint at steps 100..600, B's `self_attention/out`
drifting from step 300 on (more each step, more with depth); `ckptparity A B --steps all
--html PAGE`, and a screenshot of the top of the page (the per-step figures).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))


def write_pair(root: Path) -> tuple[str, str]:
    from pytest_ckptparity import examples as ex

    params = ex.tiny_params(0, layers=12, emb=32, mlp=64, vocab=128)
    rng = np.random.default_rng(1)
    refactored = ex._map(params, lambda x: x.copy())
    noise = {"mlp": 1e-6, "self_attention": 1e-7}
    for module, rel in noise.items():
        ex._map(refactored["decoder"]["layers"][module], lambda x, rel=rel: x.__imul__(1 + rng.standard_normal(x.shape).astype(np.float32) * rel))
    out = refactored["decoder"]["layers"]["self_attention"]["out"]["kernel"]  # (heads, layers, head_dim, emb)
    for layer in range(8, 12):
        out[:, layer] += np.float32(2e-5 * (layer - 7))
    a = ex.save(root / "linen" / "checkpoints", ex.linen_train_state(params), step=1000)
    b = ex.save(root / "nnx" / "checkpoints", ex.nnx_state(ex.unstack(refactored, "int_keys")), step=1000)
    return a, b


def write_runs(root: Path) -> tuple[str, str]:
    from pytest_ckptparity import examples as ex

    params = ex.tiny_params(0, layers=12, emb=32, mlp=64, vocab=128)
    for i, step in enumerate(range(100, 700, 100)):
        drifted = ex._map(params, lambda x: x.copy())
        out = drifted["decoder"]["layers"]["self_attention"]["out"]["kernel"]
        for layer in range(8, 12):
            out[:, layer] += np.float32(5e-6 * max(0, i - 1) * (layer - 7))
        ex.save(root / "linen" / "checkpoints", ex.linen_train_state(params, step=step), step=step)
        ex.save(root / "nnx" / "checkpoints", ex.nnx_state(ex.unstack(drifted, "int_keys"), step=step), step=step)
    return str(root / "linen" / "checkpoints"), str(root / "nnx" / "checkpoints")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", help="the PNG (default: docs/img/drift-report.png, with --steps docs/img/drift-steps.png)")
    p.add_argument("--steps", action="store_true", help="two runs over six steps: the page's per-step figures")
    p.add_argument("--keep", help="write the checkpoints and the page here (default: a temp dir, removed)")
    p.add_argument("--width", type=int, default=1280)
    args = p.parse_args()
    args.out = args.out or str(ROOT / "docs" / "img" / ("drift-steps.png" if args.steps else "drift-report.png"))

    from browser import Chromium, find_chromium

    from pytest_ckptparity import cli

    binary = find_chromium()
    if binary is None:
        sys.exit("chromium is not installed: apt-get install chromium")
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(args.keep or tmp)
        root.mkdir(parents=True, exist_ok=True)
        a, b = write_runs(root) if args.steps else write_pair(root)
        page = root / "drift-report.html"
        code = cli.main([a, b, "--html", str(page), "--color", "no", "--max-rows", "4", *(["--steps", "all"] if args.steps else [])])
        print(f"ckptparity exit code {code} (1: the pair differs, as built)")
        with Chromium(binary, width=args.width, height=1250 if args.steps else 900) as browser:
            browser.open(page)
            browser.wait_for("document.querySelectorAll('.js-plotly-plot').length > 0 && Array.from(document.querySelectorAll('.js-plotly-plot')).every(gd => gd._fullData)")
            if browser.errors:
                sys.exit(f"the page logged errors: {browser.errors}")
            Path(args.out).parent.mkdir(parents=True, exist_ok=True)
            shot = browser.screenshot(args.out, full_page=not args.steps)
        print(f"{shot}: {shot.stat().st_size:,} bytes" + (f"; page at {page}" if args.keep else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
