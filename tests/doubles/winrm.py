"""A WS-Management (WinRM) server double: the WinRS shell operations pywinrm uses.

`WinRMDouble` serves HTTPS on a loopback port with one certificate (pin it with `ca_file`),
answers Basic auth for one user, and implements what `winrm.Session.run_ps` sends: Create
(a shell), Command (`powershell -encodedcommand <UTF-16LE base64>`), Receive (the output
streams, CommandState Done and the exit code), Signal (terminate) and Delete, each reply
carrying `RelatesTo` the request's MessageID as a real host does. The decoded PowerShell goes
to a handler `script -> (stdout, stderr, exit code)`; errors travel as PowerShell's CLIXML
stream on stderr (`#< CLIXML` ... `<S S="Error">`), which pywinrm turns into text. A wrong
password gets 401 (pywinrm: InvalidCredentialsError). NTLM (pyspnego as the acceptor, the
user in an `NTLM_USER_FILE`) works per connection like a real listener, with WinRM message
encryption (`multipart/encrypted`, `application/HTTP-SPNEGO-session-encrypted`) when the
client seals its messages. Kept to what pywinrm sends: one command per shell at a time, the
whole output in one Receive.
"""

from __future__ import annotations

import base64
import html
import os
import ssl
import struct
import threading
import uuid
import xml.etree.ElementTree as ET
from collections.abc import Callable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

Handler = Callable[[str], tuple[str, str, int]]
"""A PowerShell script -> (stdout, stderr text, exit code)."""

NS = {
    "s": "http://www.w3.org/2003/05/soap-envelope",
    "a": "http://schemas.xmlsoap.org/ws/2004/08/addressing",
    "w": "http://schemas.dmtf.org/wbem/wsman/1/wsman.xsd",
    "rsp": "http://schemas.microsoft.com/wbem/wsman/1/windows/shell",
}
SHELL = "http://schemas.microsoft.com/wbem/wsman/1/windows/shell"
TRANSFER = "http://schemas.xmlsoap.org/ws/2004/09/transfer"


def clixml_error(text: str) -> str:
    """PowerShell's error stream as WinRM carries it."""
    body = html.escape(text).replace("\n", "_x000D__x000A_")
    return (
        "#< CLIXML\r\n"
        '<Objs Version="1.1.0.1" xmlns="http://schemas.microsoft.com/powershell/2004/04">'
        f'<S S="Error">{body}_x000D__x000A_</S></Objs>'
    )


def decode_command(line: str) -> str:
    """The script of `powershell -encodedcommand B64` (UTF-16LE), or the line itself."""
    parts = line.split()
    lowered = [p.lower() for p in parts]
    for flag in ("-encodedcommand", "-enc", "-e"):
        if flag in lowered:
            return base64.b64decode(parts[lowered.index(flag) + 1]).decode("utf-16-le")
    return line


@dataclass
class _Command:
    stdout: bytes
    stderr: bytes
    code: int


@dataclass
class WinRMDouble:
    """The server; `start()` it, point pywinrm at `endpoint`, `stop()` it."""

    cert: Path
    key: Path
    user: str
    password: str
    handler: Handler
    scripts: list[str] = field(default_factory=list)
    """Every script run, in order (what the plugin sent: tests count round trips)."""
    auth_failures: list[str] = field(default_factory=list)
    """Why NTLM handshakes failed (a wrong password, for the tests)."""
    _server: ThreadingHTTPServer | None = None
    _shells: dict[str, dict[str, _Command]] = field(default_factory=dict)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    @property
    def port(self) -> int:
        assert self._server is not None
        return int(self._server.server_address[1])

    @property
    def endpoint(self) -> str:
        return f"https://127.0.0.1:{self.port}/wsman"

    def start(self) -> WinRMDouble:
        double = self

        class Req(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"
            # A reply's headers and body go as two writes: with Nagle on, the body waits for
            # the client's delayed ACK (~40 ms a message), which Windows' http.sys never does.
            disable_nagle_algorithm = True
            ntlm: Any = None  # this connection's NTLM acceptor, once the handshake is done

            def log_message(self, *args: object) -> None:  # quiet
                pass

            def _reply(self, status: int, body: bytes, headers: dict[str, str]) -> None:
                self.send_response(status)
                for k, v in headers.items():
                    self.send_header(k, v)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def _denied(self, token: str | None = None) -> None:
                offer = {"WWW-Authenticate": f"Negotiate {token}"} if token else {}
                if not token:
                    self.send_response(401)
                    self.send_header("WWW-Authenticate", "Negotiate")
                    self.send_header("WWW-Authenticate", 'Basic realm="WSMAN"')
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                self._reply(401, b"", offer)

            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                auth = self.headers.get("Authorization") or ""
                if auth.startswith(("Negotiate ", "NTLM ")):
                    if not self._ntlm_step(auth.split(" ", 1)[1]):
                        return
                elif self.ntlm is None and not double._authorized(auth):
                    self._denied()
                    return
                sealed = "multipart/encrypted" in (self.headers.get("Content-Type") or "")
                if sealed:
                    body = _unseal(self.ntlm, body)
                if not body:  # pywinrm's empty POST that sets the security context up
                    self._reply(200, b"", {})
                    return
                status, out = double._soap(body)
                if sealed:
                    self._reply(status, _seal(self.ntlm, out), {"Content-Type": ENCRYPTED})
                else:
                    ctype = {"Content-Type": "application/soap+xml;charset=UTF-8"}
                    self._reply(status, out, ctype)

            def _ntlm_step(self, token: str) -> bool:
                """One leg of the handshake; True once this request is authenticated."""
                import spnego

                if self.ntlm is None or self.ntlm.complete:
                    os.environ["NTLM_USER_FILE"] = str(double._user_file())
                    self.ntlm = spnego.server(protocol="ntlm")
                try:
                    out = self.ntlm.step(base64.b64decode(token))
                except Exception as exc:  # a wrong password fails the last leg
                    double.auth_failures.append(f"{type(exc).__name__}: {exc}")
                    self.ntlm = None
                    self._denied()
                    return False
                if not self.ntlm.complete:
                    self._denied(base64.b64encode(out or b"").decode())
                    return False
                return True

        server = ThreadingHTTPServer(("127.0.0.1", 0), Req)
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.load_cert_chain(self.cert, self.key)
        server.socket = ctx.wrap_socket(server.socket, server_side=True)
        server.daemon_threads = True
        self._server = server
        threading.Thread(target=server.serve_forever, daemon=True).start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None

    def _user_file(self) -> Path:
        path = self.cert.parent / "ntlm-users"
        domain, _, name = self.user.rpartition("\\")  # DOMAIN\user, or a bare user
        path.write_text(f"{domain}:{name}:{self.password}\n")
        return path

    def _authorized(self, header: str) -> bool:
        if not header.startswith("Basic "):
            return False
        try:
            user, _, pw = base64.b64decode(header[6:]).decode().partition(":")
        except ValueError:
            return False
        return user == self.user and pw == self.password

    # ------------------------------------------------------------ SOAP

    def _soap(self, body: bytes) -> tuple[int, bytes]:
        root = ET.fromstring(body)
        action = (root.findtext("s:Header/a:Action", "", NS) or "").strip()
        message_id = (root.findtext("s:Header/a:MessageID", "", NS) or "").strip()
        shell_id = next(
            (s.text or "" for s in root.iterfind("s:Header/w:SelectorSet/w:Selector", NS)), ""
        )
        reply: str
        if action == f"{TRANSFER}/Create":
            shell_id = str(uuid.uuid4()).upper()
            with self._lock:
                self._shells[shell_id] = {}
            reply = (
                '<x:ResourceCreated xmlns:x="http://schemas.xmlsoap.org/ws/2004/09/transfer">'
                "<a:Address>http://127.0.0.1/wsman</a:Address><a:ReferenceParameters>"
                f"<w:ResourceURI>{SHELL}/cmd</w:ResourceURI><w:SelectorSet><w:Selector "
                f'Name="ShellId">{shell_id}</w:Selector></w:SelectorSet>'
                "</a:ReferenceParameters></x:ResourceCreated>"
            )
        elif action == f"{SHELL}/Command":
            line = root.findtext("s:Body/rsp:CommandLine/rsp:Command", "", NS) or ""
            args = [a.text or "" for a in root.iterfind("s:Body/rsp:CommandLine/rsp:Arguments", NS)]
            script = decode_command(" ".join([line.strip('"'), *args]))
            self.scripts.append(script)
            try:
                out, err, code = self.handler(script)
            except Exception as exc:  # a handler bug: an error the plugin sees as PowerShell's
                out, err, code = "", f"{type(exc).__name__}: {exc}", 1
            command_id = str(uuid.uuid4()).upper()
            with self._lock:
                self._shells.setdefault(shell_id, {})[command_id] = _Command(
                    out.encode(), clixml_error(err).encode() if err else b"", code
                )
            reply = (
                f"<rsp:CommandResponse><rsp:CommandId>{command_id}</rsp:CommandId>"
                "</rsp:CommandResponse>"
            )
        elif action == f"{SHELL}/Receive":
            stream = root.find("s:Body/rsp:Receive/rsp:DesiredStream", NS)
            command_id = stream.get("CommandId", "") if stream is not None else ""
            with self._lock:
                cmd = self._shells.get(shell_id, {}).get(command_id)
            if cmd is None:
                return 500, _fault(
                    message_id, "The request for the Windows Remote Shell with ShellId is not valid"
                )
            streams = "".join(
                f'<rsp:Stream Name="{name}" CommandId="{command_id}">'
                f"{base64.b64encode(data).decode()}</rsp:Stream>"
                for name, data in (("stdout", cmd.stdout), ("stderr", cmd.stderr))
                if data
            )
            reply = (
                f'<rsp:ReceiveResponse>{streams}<rsp:CommandState CommandId="{command_id}" '
                f'State="{SHELL}/CommandState/Done"><rsp:ExitCode>{cmd.code}</rsp:ExitCode>'
                "</rsp:CommandState></rsp:ReceiveResponse>"
            )
        elif action == f"{SHELL}/Signal":
            reply = "<rsp:SignalResponse/>"
        elif action == f"{TRANSFER}/Delete":
            with self._lock:
                self._shells.pop(shell_id, None)
            reply = ""
        else:
            return 500, _fault(message_id, f"unsupported action {action}")
        return 200, _envelope(action + "Response", message_id, reply)


ENCRYPTED = (
    'multipart/encrypted;protocol="application/HTTP-SPNEGO-session-encrypted";'
    'boundary="Encrypted Boundary"'
)
BOUNDARY = b"--Encrypted Boundary"


def _unseal(ctx: Any, body: bytes) -> bytes:
    """A WinRM-encrypted request body, opened with the connection's NTLM session keys."""
    out = b""
    parts = [p for p in body.split(BOUNDARY + b"\r\n") if p]
    for i in range(0, len(parts) - 1, 2):
        payload = parts[i + 1].removesuffix(BOUNDARY + b"--\r\n")
        payload = payload.replace(b"\tContent-Type: application/octet-stream\r\n", b"", 1)
        size = struct.unpack("<i", payload[:4])[0]
        out += ctx.unwrap_winrm(payload[4 : 4 + size], payload[4 + size :])
    return out


def _seal(ctx: Any, message: bytes) -> bytes:
    wrapped = ctx.wrap_winrm(message)
    return (
        BOUNDARY + b"\r\n\tContent-Type: application/HTTP-SPNEGO-session-encrypted\r\n"
        b"\tOriginalContent: type=application/soap+xml;charset=UTF-8;Length="
        + str(len(message)).encode()
        + b"\r\n"
        + BOUNDARY
        + b"\r\n\tContent-Type: application/octet-stream\r\n"
        + struct.pack("<i", len(wrapped.header))
        + wrapped.header
        + wrapped.data
        + BOUNDARY
        + b"--\r\n"
    )


def _envelope(action: str, relates_to: str, body: str) -> bytes:
    return (
        f'<s:Envelope xmlns:s="{NS["s"]}" xmlns:a="{NS["a"]}" xmlns:w="{NS["w"]}" '
        f'xmlns:rsp="{NS["rsp"]}"><s:Header><a:Action>{action}</a:Action>'
        f"<a:MessageID>uuid:{uuid.uuid4()}</a:MessageID>"
        f"<a:RelatesTo>{relates_to}</a:RelatesTo></s:Header><s:Body>{body}</s:Body></s:Envelope>"
    ).encode()


def _fault(relates_to: str, text: str) -> bytes:
    body = (
        "<s:Fault><s:Code><s:Value>s:Receiver</s:Value></s:Code><s:Reason>"
        f'<s:Text xml:lang="en-US">{html.escape(text)}</s:Text></s:Reason></s:Fault>'
    )
    return _envelope("http://schemas.dmtf.org/wbem/wsman/1/wsman/fault", relates_to, body)
