"""A local stand-in for the Hugging Face Hub's HTTP API, enough for huggingface_hub 2.x to create a repo, commit
files (every file "regular": base64 in the commit, no LFS or Xet) and download them again (repo info, tree,
resolve). Tests point HfApi / snapshot_download at it with `endpoint=`; nothing leaves 127.0.0.1."""

from __future__ import annotations

import base64
import hashlib
import json
import re
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import unquote, urlparse

import yaml


@dataclass
class Repo:
    private: bool
    files: dict[str, bytes] = field(default_factory=dict)
    commits: list[str] = field(default_factory=list)

    @property
    def sha(self) -> str:
        return self.commits[-1] if self.commits else "0" * 40


class HubStandIn:
    def __init__(self, token: str):
        self.token = token
        self.repos: dict[str, Repo] = {}
        self.auth_seen: list[str | None] = []  # the Authorization header of every write call
        hub = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *a):  # quiet
                pass

            def _send(self, code: int, body: bytes | dict | list = b"", headers: dict | None = None,
                      head: bool = False) -> None:
                data = json.dumps(body).encode() if isinstance(body, (dict, list)) else body
                self.send_response(code)
                self.send_header("Content-Type", "application/json" if isinstance(body, (dict, list))
                                 else "application/octet-stream")
                self.send_header("Content-Length", str(len(data)))
                for k, v in (headers or {}).items():
                    self.send_header(k, v)
                self.end_headers()
                if not head:
                    self.wfile.write(data)

            def _authorized(self) -> bool:
                got = self.headers.get("Authorization")
                hub.auth_seen.append(got)
                return got == f"Bearer {hub.token}"

            def _body(self) -> bytes:
                return self.rfile.read(int(self.headers.get("Content-Length", 0)))

            def do_POST(self):
                path = urlparse(self.path).path
                body = self._body()
                if path == "/api/validate-yaml":
                    content = json.loads(body)["content"]
                    m = re.match(r"---\n(.*?)\n---", content, re.S)
                    try:
                        yaml.safe_load(m.group(1) if m else "")
                    except yaml.YAMLError as e:
                        return self._send(400, {"errors": [{"message": str(e)}]})
                    return self._send(200, {"errors": [], "warnings": []})
                if not self._authorized():
                    return self._send(401, {"error": "Invalid credentials in Authorization header"})
                if path == "/api/repos/create":
                    req = json.loads(body)
                    repo_id = f"{req['organization']}/{req['name']}" if req.get("organization") else req["name"]
                    url = f"http://{self.headers['Host']}/{repo_id}"
                    if repo_id in hub.repos:
                        return self._send(409, {"error": "You already created this model repo", "url": url})
                    hub.repos[repo_id] = Repo(private=req.get("visibility") == "private" or bool(req.get("private")))
                    return self._send(200, {"url": url, "name": repo_id})
                m = re.fullmatch(r"/api/models/(.+?)/(preupload|commit)/([^/]+)", path)
                if not m or m.group(1) not in hub.repos:
                    return self._send(404, {"error": "Repository not found"})
                repo = hub.repos[m.group(1)]
                if m.group(2) == "preupload":
                    files = json.loads(body)["files"]
                    return self._send(200, {"files": [{"path": f["path"], "uploadMode": "regular",
                                                       "shouldIgnore": False, "oid": None} for f in files]})
                for line in body.splitlines():
                    item = json.loads(line)
                    if item["key"] == "file":
                        repo.files[item["value"]["path"]] = base64.b64decode(item["value"]["content"])
                    elif item["key"] in ("deletedFile",):
                        repo.files.pop(item["value"]["path"], None)
                    elif item["key"] != "header":
                        return self._send(400, {"error": f"the stand-in takes no {item['key']}"})
                sha = hashlib.sha1(body).hexdigest()
                repo.commits.append(sha)
                host = self.headers["Host"]
                return self._send(200, {"commitUrl": f"http://{host}/{m.group(1)}/commit/{sha}", "commitOid": sha,
                                        "pullRequestUrl": None})

            def _get(self, head: bool):
                path = unquote(urlparse(self.path).path)
                m = re.fullmatch(r"/api/models/([^/]+/[^/]+)(?:/revision/([^/]+))?", path)
                if m:
                    repo = hub.repos.get(m.group(1))
                    if repo is None:
                        return self._send(404, {"error": "Repository not found"}, head=head)
                    return self._send(200, {"id": m.group(1), "modelId": m.group(1), "sha": repo.sha,
                                            "private": repo.private,
                                            "siblings": [{"rfilename": p} for p in sorted(repo.files)]}, head=head)
                m = re.fullmatch(r"/api/models/([^/]+/[^/]+)/tree/([^/]+)(?:/(.*))?", path)
                if m:
                    repo = hub.repos.get(m.group(1))
                    if repo is None:
                        return self._send(404, {"error": "Repository not found"}, head=head)
                    under = (m.group(3) or "").strip("/")
                    entries = [{"type": "file", "path": p, "size": len(b), "oid": hashlib.sha1(b).hexdigest()}
                               for p, b in sorted(repo.files.items()) if not under or p.startswith(under + "/")]
                    return self._send(200, entries, head=head)
                m = re.fullmatch(r"/([^/]+/[^/]+)/resolve/([^/]+)/(.+)", path)
                if m and m.group(1) in hub.repos and m.group(3) in hub.repos[m.group(1)].files:
                    repo = hub.repos[m.group(1)]
                    data = repo.files[m.group(3)]
                    return self._send(200, data, {"X-Repo-Commit": repo.sha,
                                                  "ETag": f'"{hashlib.sha1(data).hexdigest()}"'}, head=head)
                return self._send(404, {"error": "Entry not found"}, {"X-Error-Code": "EntryNotFound"}, head=head)

            def do_GET(self):
                self._get(head=False)

            def do_HEAD(self):
                self._get(head=True)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self) -> HubStandIn:
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.server.shutdown()
        self.server.server_close()
