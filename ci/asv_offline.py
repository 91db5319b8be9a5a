"""Make published asv pages work offline: asv's index.html loads jQuery, flot, stupidtable, md5 and
bootstrap from CDNs, so on a machine without internet the pages show only "Can not determine
continental origin of swallow". This copies the same libraries, vendored with their licenses in
ci/asv-www/ (from npm, see its README), next to the pages and points the tags at them.

    python ci/asv_offline.py .asv/html      # ci/asv.sh runs it after `asv publish`

A CDN tag this script does not know (a newer asv) is an error naming it, never left in silently.
"""

from __future__ import annotations

import re
import shutil
import sys
from pathlib import Path

VENDOR = Path(__file__).with_name("asv-www")
TARGET = "vendor"  # folder inside the published pages
# asv 0.6's CDN address -> the vendored file (same version; flot unminified, stupidtable 1.1.3)
SOURCES = {
    "https://code.jquery.com/jquery-3.3.1.min.js": "jquery.min.js",
    "https://cdnjs.cloudflare.com/ajax/libs/flot/0.8.3/jquery.flot.min.js": "jquery.flot.js",
    "https://cdnjs.cloudflare.com/ajax/libs/flot/0.8.3/jquery.flot.time.min.js": "jquery.flot.time.js",
    "https://cdnjs.cloudflare.com/ajax/libs/flot/0.8.3/jquery.flot.selection.min.js": "jquery.flot.selection.js",
    "https://cdnjs.cloudflare.com/ajax/libs/flot/0.8.3/jquery.flot.categories.min.js": "jquery.flot.categories.js",
    "https://cdn.jsdelivr.net/npm/flot-orderbars@1.0.0/js/jquery.flot.orderBars.js": "jquery.flot.orderBars.js",
    "https://cdnjs.cloudflare.com/ajax/libs/stupidtable/1.0.1/stupidtable.min.js": "stupidtable.min.js",
    "https://cdnjs.cloudflare.com/ajax/libs/blueimp-md5/2.19.0/js/md5.min.js": "md5.min.js",
    "https://cdn.jsdelivr.net/npm/bootstrap@3.1.1/dist/js/bootstrap.min.js": "bootstrap.min.js",
    "https://cdn.jsdelivr.net/npm/bootstrap@3.1.1/dist/css/bootstrap.min.css": "css/bootstrap.min.css",
}
# a <script src=...> or <link href=...> tag loading from another host
REMOTE_TAG = re.compile(r"<(script|link)\b[^>]*?\b(?:src|href)=\"(https?://[^\"]+)\"[^>]*>")


def localize(html: str) -> str:
    """``html`` with every remote script/stylesheet tag replaced by one loading the vendored file
    (no ``integrity``/``crossorigin``: the files are checked against ci/asv-www/README.md instead);
    ValueError naming any remote tag without a vendored file."""

    def local(match: re.Match) -> str:
        kind, url = match.groups()
        if kind == "link" and "stylesheet" not in match.group(0):
            return match.group(0)  # a plain hyperlink, not a resource the page needs
        if url not in SOURCES:
            raise ValueError(f"asv page loads {url}, which is not vendored; known: {', '.join(SOURCES)}")
        path = f"{TARGET}/{SOURCES[url]}"
        if kind == "link":
            return f'<link rel="stylesheet" href="{path}">'
        return f'<script src="{path}" onerror="js_load_failure()">'

    return REMOTE_TAG.sub(local, html)


def make_offline(html_dir: Path) -> list[Path]:
    """Copy the vendored libraries into ``html_dir/vendor`` and rewrite every page of ``html_dir``
    that loads one from a CDN; returns the rewritten pages."""
    shutil.copytree(VENDOR, html_dir / TARGET, dirs_exist_ok=True)
    changed = []
    for page in sorted(html_dir.glob("*.html")):
        text = page.read_text(encoding="utf-8")
        new = localize(text)
        if new != text:
            page.write_text(new, encoding="utf-8")
            changed.append(page)
    return changed


if __name__ == "__main__":
    if len(sys.argv) != 2 or not Path(sys.argv[1], "index.html").is_file():
        sys.exit(f"usage: python {sys.argv[0]} HTML_DIR  (the folder `asv publish` wrote, with index.html)")
    for page in make_offline(Path(sys.argv[1])):
        print(f"asv pages: {page} loads its libraries from {TARGET}/ (offline)")
