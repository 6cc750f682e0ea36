"""Installing and starting: the twistd plugin, and one-line start-up errors."""

import os
import socket
import subprocess

from harness import TWISTD, run_twistd_expecting_failure, start_gateway, write_config


def test_twistd_lists_the_wsgate_plugin():
    out = subprocess.run([TWISTD, "--help"], capture_output=True, text=True).stdout
    assert "wsgate" in out


def test_twistd_wsgate_help_documents_config():
    proc = subprocess.run([TWISTD, "wsgate", "--help"], capture_output=True, text=True)
    assert proc.returncode == 0
    assert "--config" in proc.stdout and "/etc/wsgate/wsgate.ini" in proc.stdout


def test_bad_config_prints_one_line_and_exits_1(tmp_path):
    path = write_config(tmp_path, """
        [listen:main]
        endpoint = tcp:0:interface=127.0.0.1
        ping_timeout = forever
        """)
    code, stderr, stdout = run_twistd_expecting_failure(path)
    assert code == 1
    assert stderr.strip() == (f"wsgate: {path}: [listen:main] ping_timeout: expected a "
                              "duration such as 500ms, 10s, 2m or 1h, got 'forever'")
    assert "Traceback" not in stderr + stdout


def test_missing_config_file_is_one_line(tmp_path):
    code, stderr, _ = run_twistd_expecting_failure(tmp_path / "absent.ini")
    assert code == 1
    assert stderr.strip().startswith("wsgate: ") and "cannot read the config file" in stderr
    assert len(stderr.strip().splitlines()) == 1


def test_unreadable_certificate_is_one_line(tmp_path):
    path = write_config(tmp_path, """
        [listen:main]
        endpoint = tcp:0:interface=127.0.0.1
        tls_cert = nothere.pem
        """)
    code, stderr, _ = run_twistd_expecting_failure(path)
    assert code == 1
    assert "[listen:main] tls_cert: cannot read" in stderr
    assert len(stderr.strip().splitlines()) == 1


def test_port_in_use_is_one_line_and_exit_1(tmp_path):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        path = write_config(tmp_path, f"""
            [listen:web]
            endpoint = tcp:{port}:interface=127.0.0.1
            """)
        code, stderr, stdout = run_twistd_expecting_failure(path)
    assert code == 1
    assert stderr.strip() == (f"wsgate: cannot listen on tcp:{port}:interface=127.0.0.1 "
                              "([listen:web]): Address already in use")
    assert "Traceback" not in stderr + stdout


def test_sigterm_exits_0(tmp_path):
    gw = start_gateway(tmp_path, "[route:echo]\npath = /echo\necho = yes\n")
    assert gw.stop() == 0


def test_make_run_takes_another_config(tmp_path):
    """Issue 18, item 12: the README's first command also runs a newcomer's own file."""
    import json
    import signal
    import subprocess

    from harness import ROOT

    config = tmp_path / "mine.ini"
    config.write_text("[wsgate]\nlog_format = json\n[listen:mine]\n"
                      "endpoint = tcp:0:interface=127.0.0.1\n[route:e]\npath = /e\necho = yes\n")
    proc = subprocess.Popen(["make", "-s", "run", f"CONFIG={config}"], cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            stdin=subprocess.DEVNULL, start_new_session=True)
    try:
        listening = None
        for raw in proc.stdout:
            try:
                event = json.loads(raw)
            except ValueError:
                continue
            if event.get("event") == "wsgate.listening":
                listening = event
                break
        assert listening is not None and listening["listener"] == "mine"
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(20)
