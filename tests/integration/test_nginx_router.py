"""The nginx router's file work against the real NGINX binary (`nginx -t` on a config that includes the upstream
file), without a lab: what it renders, what it reads back, and a test that fails putting the old file back."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from temporalio.exceptions import ApplicationError

from activities.nginx import NginxSplit, parse, render
from opsflow.rollout import NginxRouter

NGINX = shutil.which("nginx") or "/usr/sbin/nginx"
pytestmark = pytest.mark.skipif(not Path(NGINX).exists(), reason="nginx is not installed")


def router(tmp_path: Path, canary: list[str] | None = None) -> NginxRouter:
    d = tmp_path
    (d / "upstream.conf").write_text("upstream web {\n    server 127.0.0.1:8001;\n}\n")
    (d / "nginx.conf").write_text(f"""pid {d}/nginx.pid;
error_log {d}/error.log;
events {{ worker_connections 16; }}
http {{
  include {d}/upstream.conf;
  server {{ listen 127.0.0.1:1; location / {{ proxy_pass http://web; }} }}
}}
""")
    return NginxRouter(kind="nginx", upstream_file=str(d / "upstream.conf"), upstream="web",
                       servers={"stable": ["127.0.0.1:8001", "127.0.0.1:8002"], "canary": canary or ["127.0.0.1:8003"],
                                "baseline": ["127.0.0.1:8004"]},
                       test=[NGINX, "-t", "-q", "-p", str(d), "-c", str(d / "nginx.conf"), "-e", str(d / "error.log")],
                       reload=["sh", "-c", f"echo reloaded >> {d}/reloads"])


def test_shares_become_weights_split_evenly_down_at_zero_and_read_back(tmp_path):
    r = router(tmp_path)
    split = NginxSplit(r)
    assert split.shares() == {"stable": 100, "canary": 0, "baseline": 0}  # as a person wrote it
    assert split.set({"stable": 50, "canary": 25, "baseline": 25}) == {"stable": 50, "canary": 25, "baseline": 25}
    text = Path(r.upstream_file).read_text()
    # two stable servers share stable's 50: 25 each, scaled by lcm(2, 1, 1) = 2 to stay whole
    assert "server 127.0.0.1:8001 weight=50" in text and "server 127.0.0.1:8002 weight=50" in text
    assert "server 127.0.0.1:8003 weight=50" in text and "server 127.0.0.1:8004 weight=50" in text
    assert split.set({"stable": 100, "canary": 0, "baseline": 0}) == {"stable": 100, "canary": 0, "baseline": 0}
    assert "server 127.0.0.1:8003 down;" in Path(r.upstream_file).read_text()
    assert (tmp_path / "reloads").read_text().count("reloaded") == 2  # tested by nginx -t, then reloaded
    assert parse(r, render(r, {"stable": 95, "canary": 5})) == {"stable": 95, "canary": 5, "baseline": 0}


def test_a_config_nginx_refuses_is_never_reloaded_and_the_old_file_comes_back(tmp_path):
    r = router(tmp_path, canary=["127.0.0.1:99999"])  # a port NGINX rejects
    old = Path(r.upstream_file).read_text()
    with pytest.raises(ApplicationError) as exc:
        NginxSplit(r).set({"stable": 75, "canary": 25})
    assert exc.value.non_retryable and "nginx -t" in str(exc.value) and "99999" in str(exc.value)
    assert Path(r.upstream_file).read_text() == old and not (tmp_path / "reloads").exists()


def test_a_missing_file_or_upstream_names_what_is_wrong(tmp_path):
    r = router(tmp_path)
    Path(r.upstream_file).write_text("upstream other {\n    server 127.0.0.1:8001;\n}\n")
    with pytest.raises(ApplicationError, match="has no upstream 'web' block"):
        NginxSplit(r).shares()
    Path(r.upstream_file).unlink()
    with pytest.raises(ApplicationError, match="does not exist on this worker's host"):
        NginxSplit(r).shares()
