"""asv history pages that open without internet: ci/asv_offline.py points asv's CDN tags at the
libraries vendored in ci/asv-www/, and headless Chromium with every non-local host unreachable
renders the track_sqnr_db graph of a published result set (tests/data/asv: one real asv run of
``formats.Quality.track_sqnr_db``), while the same pages with asv's CDN tags do not."""

from __future__ import annotations

import functools
import hashlib
import http.server
import json
import re
import runpy
import shutil
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
VENDOR = ROOT / "ci" / "asv-www"
offline = runpy.run_path(str(ROOT / "ci" / "asv_offline.py"))
GRAPH = "#formats.Quality.track_sqnr_db"
SWALLOW = "Can not determine continental origin of swallow"


def test_vendored_files_are_the_recorded_ones_with_licenses() -> None:
    recorded = dict(
        reversed(line.split("  ", 1))
        for line in (VENDOR / "README.md").read_text().splitlines()
        if re.fullmatch(r"[0-9a-f]{64}  \S+", line)
    )
    files = {
        p.relative_to(VENDOR).as_posix(): p
        for p in VENDOR.rglob("*")
        if p.is_file() and p.name != "README.md" and "licenses" not in p.parts
    }
    assert recorded == {name: hashlib.sha256(p.read_bytes()).hexdigest() for name, p in files.items()}
    assert set(offline["SOURCES"].values()) <= set(files)
    licenses = {p.stem for p in (VENDOR / "licenses").iterdir()}
    assert licenses == {"jquery", "flot", "flot-orderbars", "stupid-table-plugin", "blueimp-md5", "bootstrap"}


def test_every_cdn_tag_of_the_installed_asv_is_replaced() -> None:
    import asv

    html = (Path(asv.__file__).parent / "www" / "index.html").read_text()
    local = offline["localize"](html)
    remote = [
        m.group(0)
        for m in offline["REMOTE_TAG"].finditer(local)
        if "<script" in m.group(0) or "stylesheet" in m.group(0)
    ]
    assert remote == []
    assert local.count('src="vendor/') == 9 and 'href="vendor/css/bootstrap.min.css"' in local


def test_an_unknown_cdn_tag_is_an_error_naming_it() -> None:
    with pytest.raises(ValueError, match=r"loads https://cdn\.example/x\.js, which is not vendored"):
        offline["localize"]('<script src="https://cdn.example/x.js"></script>')


@pytest.fixture(scope="module")
def chromium() -> str:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        if path := shutil.which(name):
            return path
    pytest.skip("no Chromium on PATH (CI installs it: ci/setup.sh with CI=true)")


@pytest.fixture(scope="module")
def published(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """``asv publish`` of the stored result set, recorded against a one-commit git repository."""
    tmp = tmp_path_factory.mktemp("asv")
    repo, results = tmp / "repo", tmp / "results" / "harness-ci"
    git = ["git", "-C", str(repo), "-c", "user.name=t", "-c", "user.email=t@t"]
    repo.mkdir()
    subprocess.run([*git, "init", "-q", "-b", "main"], check=True)
    subprocess.run([*git, "commit", "-q", "--allow-empty", "-m", "history"], check=True)
    commit = subprocess.run([*git, "rev-parse", "HEAD"], check=True, capture_output=True, text=True).stdout.strip()
    results.mkdir(parents=True)
    data = ROOT / "tests" / "data" / "asv"
    shutil.copy(data / "benchmarks.json", results.parent)
    shutil.copy(data / "machine.json", results)
    result = (data / "result.json").read_text().replace("COMMIT", commit)
    (results / f"{commit[:8]}-existing-py_python.json").write_text(result)
    config = {
        "version": 1,
        "project": "harness",
        "repo": str(repo),
        "branches": ["main"],
        "environment_type": "existing",
        "benchmark_dir": str(tmp / "benchmarks"),
        "results_dir": str(results.parent),
        "html_dir": str(tmp / "html"),
    }
    (tmp / "asv.conf.json").write_text(json.dumps(config))
    subprocess.run([sys.executable, "-m", "asv", "publish", "--config", str(tmp / "asv.conf.json")], check=True)
    return tmp / "html"


@pytest.fixture(scope="module")
def serve() -> Iterator:
    """``serve(folder)``: its URL on a local HTTP server (asv's pages read their JSON by XHR, which
    browsers refuse from file://; `asv preview` serves them the same way)."""
    servers = []

    def start(folder: Path) -> str:
        handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(folder))
        server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
        server.RequestHandlerClass.log_message = lambda *args: None
        threading.Thread(target=server.serve_forever, daemon=True).start()
        servers.append(server)
        return f"http://127.0.0.1:{server.server_port}/"

    yield start
    for server in servers:
        server.shutdown()


def rendered_dom(chromium: str, url: str) -> str:
    """The page's DOM after its scripts ran, every host but 127.0.0.1 unreachable (no internet)."""
    offline_flags = ["--proxy-server=http://127.0.0.1:9", "--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE 127.0.0.1"]
    browser = [chromium, "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", *offline_flags]
    cmd = [*browser, "--virtual-time-budget=20000", "--dump-dom", url]
    return subprocess.run(cmd, check=True, capture_output=True, text=True, timeout=120).stdout


def test_published_graph_renders_offline(chromium: str, published: Path, serve, tmp_path: Path) -> None:
    with_cdn = tmp_path / "with-cdn"
    shutil.copytree(published, with_cdn)
    dom = rendered_dom(chromium, serve(with_cdn) + GRAPH)  # the control: asv's pages as published
    assert SWALLOW in dom and "flot-base" not in dom

    offline["make_offline"](published)
    dom = rendered_dom(chromium, serve(published) + GRAPH)
    assert SWALLOW not in dom
    assert dom.count('class="flot-base"') >= 1  # flot drew the graph's canvas
    legend = re.findall(r'class="legendLabel">([^<]+)<', dom)
    assert "data-normal; format-mxfp4" in legend and len(legend) == 8  # one line per registered format
    ticks = [float(t) for t in re.findall(r'class="flot-tick-label tickLabel"[^>]*>([0-9.]+)<', dom)]
    stored = json.loads((ROOT / "tests" / "data" / "asv" / "result.json").read_text())
    normal = stored["results"]["formats.Quality.track_sqnr_db"][0][0::2]  # (format, data) grid, data fastest
    assert ticks and min(ticks) <= max(normal) and max(ticks) >= min(normal)  # the y axis spans the stored dB
