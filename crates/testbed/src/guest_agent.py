# Runs inside a test node (a User-Mode Linux guest): executes shell scripts the host
# sends, one per TCP connection, and answers with their exit status and output.
# Request: one JSON line {"token": "...", "script": "...", "timeout": seconds}; the token
# is read from the file named on the command line (in the host's 0700 node directory),
# so only the test that booted the node can run commands as the guest's root.
# Reply:   one JSON line {"rc": int, "stdout": str, "stderr": str}; rc -1 on timeout,
# after the script's whole process group is killed.
import json
import os
import signal
import socketserver
import subprocess
import sys

TOKEN = open(sys.argv[1]).read().strip()


class Handler(socketserver.StreamRequestHandler):
    def handle(self):
        line = self.rfile.readline()
        if not line:
            return
        req = json.loads(line)
        if req.get("token") != TOKEN:
            return
        p = subprocess.Popen(
            ["/bin/sh", "-c", req["script"]],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )
        try:
            out, err = p.communicate(timeout=req.get("timeout", 600))
            reply = {"rc": p.returncode, "stdout": out, "stderr": err}
        except subprocess.TimeoutExpired:
            os.killpg(p.pid, signal.SIGKILL)
            out, err = p.communicate()
            reply = {"rc": -1, "stdout": out, "stderr": err + b"\n(timed out)"}
        for k in ("stdout", "stderr"):
            reply[k] = reply[k].decode("utf-8", "replace")
        self.wfile.write(json.dumps(reply).encode() + b"\n")


class Server(socketserver.ThreadingTCPServer):
    allow_reuse_address = True
    daemon_threads = True
    # Connections wait in the kernel's queue until accepted (past it SYNs are dropped
    # and resent, never refused); the default of 5 is short for a busy guest.
    request_queue_size = 64


server = Server((sys.argv[2], 7000), Handler)
# The host's readiness signal (on the console): the socket is listening from here on.
print("guest agent: listening on %s:7000" % sys.argv[2], flush=True)
server.serve_forever()
