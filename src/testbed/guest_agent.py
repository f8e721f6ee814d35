# Runs inside a test node (a User-Mode Linux guest): executes shell scripts the host
# sends, one per TCP connection, and answers with their exit status and output.
# Request: one JSON line {"script": "...", "timeout": seconds}.
# Reply:   one JSON line {"rc": int, "stdout": str, "stderr": str}; rc -1 on timeout.
import json
import socketserver
import subprocess


class Handler(socketserver.StreamRequestHandler):
    def handle(self):
        req = json.loads(self.rfile.readline())
        try:
            done = subprocess.run(
                ["/bin/sh", "-c", req["script"]],
                capture_output=True,
                timeout=req.get("timeout", 600),
                stdin=subprocess.DEVNULL,
            )
            reply = {"rc": done.returncode, "stdout": done.stdout, "stderr": done.stderr}
        except subprocess.TimeoutExpired as e:
            reply = {"rc": -1, "stdout": e.stdout or b"", "stderr": (e.stderr or b"") + b"\n(timed out)"}
        for k in ("stdout", "stderr"):
            reply[k] = reply[k].decode("utf-8", "replace")
        self.wfile.write(json.dumps(reply).encode() + b"\n")


class Server(socketserver.ThreadingTCPServer):
    allow_reuse_address = True
    daemon_threads = True


Server(("0.0.0.0", 7000), Handler).serve_forever()
