"""The HTML page template that makes `dvc plots show` (and `dvc plots diff`) render offline.

    python -m ops.plots_offline --write-template .dvc/plots_offline.html   # make install
    python -m ops.plots_offline                 # dvc_plots/index.html, the workspace
    python -m ops.plots_offline HEAD~1 HEAD     # dvc plots diff of two revisions

DVC's own page loads Vega, Vega-Lite and Vega-Embed from a CDN, so without a network
it stays blank. `make install` writes a template that inlines the three libraries
instead, and `.dvc/config` names it (`plots.html_template`, a path relative to `.dvc/`),
so plain `dvc plots show` uses it. The template has no `{scripts}` placeholder, so DVC's
CDN tags are left out. The libraries come from the pinned `vl-convert-python` package
(`vl_convert.javascript_bundle`, which sets `vega`, `vegaLite` and `vegaEmbed` on
`window`): nothing is downloaded when the page is built or opened.
"""

from __future__ import annotations

import argparse
import os
import subprocess
from pathlib import Path

# The Vega-Lite major version DVC's templates declare ($schema .../vega-lite/v5.json).
VEGA_LITE_VERSION = "5.20"
OUTPUT_DIR = Path("dvc_plots")
# Where `make install` writes the template; .dvc/config's `plots.html_template` names it
# relative to .dvc/ (DVC joins a relative value to the .dvc directory).
TEMPLATE = Path(".dvc") / "plots_offline.html"

PAGE = """<!DOCTYPE html>
<html>
<head>
  <meta charset="utf-8">
  {refresh_tag}
  <title>knapsack-rl: DVC plots</title>
  <!-- Vega, Vega-Lite, Vega-Embed inlined (vl-convert-python @VERSION@): no CDN -->
  <script>
@BUNDLE@
  </script>
  <style>body { font-family: sans-serif; margin: 1.5em; } h1 { font-size: 1.2em; }</style>
</head>
<body>
  <h1>knapsack-rl training curves</h1>
  {plot_divs}
</body>
</html>
"""


def vega_bundle() -> tuple[str, str]:
    """The JavaScript of Vega + Vega-Lite + Vega-Embed, and the vl-convert version."""
    try:
        import vl_convert
    except ImportError as error:  # pragma: no cover - the lock installs it
        raise SystemExit(
            "vl-convert-python is missing: `make install` installs requirements/lock-cpu.txt"
        ) from error
    bundle = vl_convert.javascript_bundle(vl_version=VEGA_LITE_VERSION)
    if "</script" in bundle:
        raise RuntimeError("the Vega bundle contains '</script': it cannot be inlined as is")
    return bundle, vl_convert.__version__


def html_template(bundle: str, vl_convert_version: str) -> str:
    """A DVC HTML template: `{plot_divs}` (and `{refresh_tag}`) filled by DVC, no `{scripts}`."""
    return PAGE.replace("@VERSION@", vl_convert_version).replace("@BUNDLE@", bundle)


def write_template(path: Path = TEMPLATE) -> Path:
    """Write the offline template (Vega inlined) to `path`, replacing it whole; return it."""
    page = html_template(*vega_bundle())
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(path.name + ".tmp")
    partial.write_text(page, encoding="utf-8")
    partial.replace(path)  # a reader never sees half a template
    return path


def dvc_command(revisions: list[str], out_dir: Path) -> list[str]:
    """Plain `dvc plots show` (`diff` with revisions): the template comes from .dvc/config."""
    verb = ["plots", "diff", *revisions] if revisions else ["plots", "show"]
    return ["dvc", *verb, "-o", str(out_dir)]


def write_plots(revisions: list[str], out_dir: Path = OUTPUT_DIR) -> Path:
    """Render the plots of `dvc.yaml` to `out_dir/index.html`; return its path."""
    if not TEMPLATE.is_file():
        write_template()
    env = os.environ | {"DVC_NO_ANALYTICS": "1"}
    subprocess.run(dvc_command(revisions, out_dir), check=True, env=env)
    return out_dir / "index.html"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("revisions", nargs="*", help="git revisions to compare (dvc plots diff)")
    parser.add_argument("-o", "--out", type=Path, default=OUTPUT_DIR, help="output folder")
    parser.add_argument(
        "--write-template",
        type=Path,
        metavar="PATH",
        help=f"only write the offline page template to PATH (make install: {TEMPLATE})",
    )
    args = parser.parse_args(argv)
    if args.write_template:
        print(f"DVC plots template (Vega inlined): {write_template(args.write_template)}")
        return
    write_plots(args.revisions, args.out)  # DVC prints the page's file:// address


if __name__ == "__main__":
    main()
