"""The stand-in ``flwr-clientapp`` that osteo-client puts first on its SuperNode's PATH (stdlib only: it
runs as ``python -S -E`` and starts in milliseconds).

``clientapp_shim.py SERVER REAL [flwr-clientapp arguments]``: hand the arguments, the working folder, the
environment and this process's standard streams to the fork server at SERVER (client/fork_server.py),
wait for the forked ClientApp and exit with its code. If no fork server answers, become Flower's own program REAL,
so a message is never lost to a missing server, only slower.
"""
import json
import os
import socket
import sys


def main(argv: list) -> int:
    server, real, args = argv[0], argv[1], argv[2:]
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.connect(server)
    except OSError:
        sock.close()
        os.execv(real, [real, *args])
    with sock:
        request = json.dumps({"argv": args, "cwd": os.getcwd(), "env": dict(os.environ)}).encode() + b"\n"
        socket.send_fds(sock, [request], [0, 1, 2])
        answer = b""
        while chunk := sock.recv(64):
            answer += chunk
    text = answer.decode(errors="replace").strip()
    if text.lstrip("-").isdigit():
        return int(text)
    sys.stderr.write("flwr-clientapp stand-in: the fork server ended before the ClientApp did\n")
    return 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
