"""A small fake of the Hugging Face Hub on 127.0.0.1, answering the routes the publish flow uses.

Routes and payloads follow huggingface_hub 2.4's client code (hf_api.py, _commit_api.py, lfs.py):
whoami-v2, repos/create, repo info, tree listing, validate-yaml, preupload, the LFS batch API plus a
basic PUT transfer, the ndjson commit, and Space variables/secrets. It keeps what arrived (files,
commits, variables, every request) so a test can check it, and can drop the connection of chosen
requests to play a network failure. The xet transfer protocol is not faked: tests disable hf_xet so
large files take the LFS path.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import json
import re
import socket
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import urlsplit

import yaml

REPO = r"(?P<repo>[\w.-]+/[\w.-]+)"
KIND = r"(?P<kind>models|spaces)"
LFS_SUFFIXES = (".safetensors", ".bin", ".pt", ".png", ".jpg", ".gguf")


def git_oid(content: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(content) + content).hexdigest()


@dataclass
class Commit:
    summary: str
    description: str
    added: list[str]
    deleted: list[str]
    oid: str


@dataclass
class Repo:
    repo_id: str
    kind: str  # "model" or "space"
    owner: str
    private: bool = False
    sdk: str | None = None
    files: dict[str, bytes] = field(default_factory=dict)
    lfs_paths: set[str] = field(default_factory=set)
    commits: list[Commit] = field(default_factory=list)
    variables: dict[str, dict[str, Any]] = field(default_factory=dict)
    secrets: dict[str, str] = field(default_factory=dict)

    @property
    def head(self) -> str:
        return self.commits[-1].oid if self.commits else "0" * 40


class FakeHub:
    """State of the fake Hub; ``url`` is the endpoint to give ``HfApi(endpoint=...)``."""

    def __init__(self, tokens: dict[str, str], orgs: dict[str, list[str]] | None = None):
        self.tokens = tokens  # token -> user name
        self.orgs = orgs or {}  # user name -> organisations the user may write to
        self.repos: dict[tuple[str, str], Repo] = {}
        self.lfs: dict[str, bytes] = {}
        self.requests: list[tuple[str, str]] = []
        self.drop: dict[str, int] = {}  # route name -> how many of its next requests lose their connection
        self.conflict_first = False  # answer 409 for an existing repo before checking the namespace (else 403)
        self.lock = threading.Lock()
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(self))
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    def start(self) -> FakeHub:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()

    def add_repo(self, repo_id: str, kind: str = "model", owner: str | None = None,
                 files: dict[str, bytes] | None = None) -> Repo:
        """A repo as the Hub creates it (one commit with .gitattributes), plus ``files``."""
        repo = Repo(repo_id, kind, owner or repo_id.split("/")[0])
        repo.files[".gitattributes"] = b"*.safetensors filter=lfs diff=lfs merge=lfs -text\n"
        repo.files.update(files or {})
        repo.commits.append(Commit("initial commit", "", list(repo.files), [],
                                   hashlib.sha1(repo_id.encode()).hexdigest()))
        self.repos[(kind, repo_id)] = repo
        return repo

    def repo(self, repo_id: str, kind: str = "model") -> Repo:
        return self.repos[(kind, repo_id)]

    def namespaces(self, user: str) -> set[str]:
        return {user, *self.orgs.get(user, [])}


def _handler(hub: FakeHub) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, format: str, *args: Any) -> None:  # keep test output clean
            pass

        # --- plumbing -----------------------------------------------------------------

        def _body(self) -> bytes:
            if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
                out = b""
                while True:
                    size = int(self.rfile.readline().split(b";")[0].strip(), 16)
                    if size == 0:
                        self.rfile.readline()
                        return out
                    out += self.rfile.read(size)
                    self.rfile.readline()
            return self.rfile.read(int(self.headers.get("Content-Length") or 0))

        def _send(self, status: int, payload: Any = None, headers: dict[str, str] | None = None) -> None:
            data = json.dumps(payload if payload is not None else {}).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            for k, v in (headers or {}).items():
                self.send_header(k, v)
            self.end_headers()
            self.wfile.write(data)

        def _error(self, status: int, message: str, code: str | None = None) -> None:
            self._send(status, {"error": message}, {"X-Error-Code": code} if code else None)

        def _user(self) -> str | None:
            auth = self.headers.get("Authorization", "")
            return hub.tokens.get(auth.removeprefix("Bearer ").strip()) if auth.startswith("Bearer ") else None

        def _dispatch(self, method: str) -> None:
            path = urlsplit(self.path).path
            body = self._body() if method in ("POST", "PUT") else b""
            with hub.lock:
                hub.requests.append((method, path))
            for route_method, pattern, name in ROUTES:
                m = re.fullmatch(pattern, path)
                if route_method == method and m:
                    with hub.lock:
                        if hub.drop.get(name, 0) > 0:
                            hub.drop[name] -= 1
                            # the request arrived in full, then the connection dies without an answer
                            self.close_connection = True
                            with contextlib.suppress(OSError):
                                self.connection.shutdown(socket.SHUT_RDWR)
                            return
                    if self.headers.get("Authorization") and self._user() is None:
                        return self._error(401, "Invalid credentials in Authorization header")
                    with hub.lock:
                        return getattr(self, name)(body=body, **m.groupdict())
            self._error(404, f"fake hub: no route {method} {path}")

        def do_GET(self) -> None:
            self._dispatch("GET")

        def do_POST(self) -> None:
            self._dispatch("POST")

        def do_PUT(self) -> None:
            self._dispatch("PUT")

        def _repo(self, kind: str, repo_id: str, write: bool) -> Repo | None:
            repo = hub.repos.get((kind.rstrip("s"), repo_id))
            user = self._user()
            mine = user is not None and repo is not None and repo.owner in hub.namespaces(user)
            if repo is None or (repo.private and not mine):
                self._error(404, "Repository not found", "RepoNotFound")
                return None
            if write and not mine:
                self._error(403, f"You don't have the rights to write to {repo_id}")
                return None
            return repo

        # --- routes ---------------------------------------------------------------------

        def whoami(self, body: bytes) -> None:
            user = self._user()
            if user is None:
                return self._error(401, "Invalid credentials in Authorization header")
            self._send(200, {"type": "user", "name": user, "orgs": [{"name": o} for o in hub.orgs.get(user, [])],
                             "auth": {"type": "access_token", "accessToken": {"displayName": "test", "role": "write"}}})

        def create_repo(self, body: bytes) -> None:
            user = self._user()
            if user is None:
                return self._error(401, "You must be authenticated to create a repo")
            req = json.loads(body)
            namespace = req.get("organization") or user
            kind = req.get("type") or "model"
            repo_id = f"{namespace}/{req['name']}"
            prefix = "spaces/" if kind == "space" else ""
            exists = (kind, repo_id) in hub.repos
            if namespace not in hub.namespaces(user) and not (exists and hub.conflict_first):
                return self._error(403, f"You don't have the rights to create a {kind} under the namespace "
                                        f"\"{namespace}\"")
            if exists:  # the real Hub names the existing repo's URL too
                return self._send(409, {"error": f"You already created this {kind} repo",
                                        "url": f"{hub.url}/{prefix}{repo_id}"})
            if kind == "space" and req.get("sdk") not in ("gradio", "docker", "static", "streamlit"):
                return self._error(400, "a Space needs an sdk")
            repo = hub.add_repo(repo_id, kind, namespace)
            repo.private = req.get("visibility") == "private"
            repo.sdk = req.get("sdk")
            self._send(200, {"url": f"{hub.url}/{prefix}{repo_id}", "name": repo_id})

        def repo_info(self, body: bytes, kind: str, repo: str, rev: str | None = None) -> None:
            r = self._repo(kind, repo, write=False)
            if r:
                self._send(200, {"id": repo, "sha": r.head, "private": r.private, "sdk": r.sdk,
                                 "siblings": [{"rfilename": p} for p in sorted(r.files)]})

        def tree(self, body: bytes, kind: str, repo: str, rev: str) -> None:
            r = self._repo(kind, repo, write=False)
            if r:
                self._send(200, [{"type": "file", "path": p, "size": len(c), "oid": git_oid(c)}
                                 for p, c in sorted(r.files.items())])

        def validate_yaml(self, body: bytes) -> None:
            from huggingface_hub import ModelCard, SpaceCard

            req = json.loads(body)
            try:
                card = (SpaceCard if req.get("repoType") == "space" else ModelCard)(req["content"])
                yaml.safe_load(card.data.to_yaml())
            except Exception as e:  # the real Hub answers 400 with a list of errors
                return self._send(400, {"errors": [{"message": str(e)}]})
            self._send(200, {"errors": [], "warnings": []})

        def preupload(self, body: bytes, kind: str, repo: str, rev: str) -> None:
            r = self._repo(kind, repo, write=True)
            if not r:
                return
            files = []
            for f in json.loads(body)["files"]:
                sample = base64.b64decode(f["sample"])
                lfs = f["path"].endswith(LFS_SUFFIXES) or b"\0" in sample
                old = r.files.get(f["path"])
                oid = None if old is None else (hashlib.sha256(old).hexdigest() if lfs else git_oid(old))
                files.append({"path": f["path"], "uploadMode": "lfs" if lfs else "regular", "shouldIgnore": False,
                              "oid": oid})
            self._send(200, {"files": files, "commitOid": r.head})

        def lfs_batch(self, body: bytes, repo: str, space: str | None = None) -> None:
            r = self._repo("spaces" if space else "models", repo, write=True)
            if not r:
                return
            objects = []
            for o in json.loads(body)["objects"]:
                entry = {"oid": o["oid"], "size": o["size"]}
                if o["oid"] not in hub.lfs:
                    entry["actions"] = {"upload": {"href": f"{hub.url}/lfs-upload/{o['oid']}"}}
                objects.append(entry)
            self._send(200, {"transfer": "basic", "objects": objects})

        def lfs_upload(self, body: bytes, oid: str) -> None:
            if hashlib.sha256(body).hexdigest() != oid:
                return self._error(400, "sha256 mismatch")
            hub.lfs[oid] = body
            self._send(200, {})

        def commit(self, body: bytes, kind: str, repo: str, rev: str) -> None:
            r = self._repo(kind, repo, write=True)
            if not r:
                return
            lines = [json.loads(line) for line in body.splitlines() if line.strip()]
            header = lines[0]["value"]
            files, lfs_paths, deleted = dict(r.files), set(r.lfs_paths), []
            for item in lines[1:]:
                value = item["value"]
                if item["key"] == "file":
                    files[value["path"]] = base64.b64decode(value["content"])
                    lfs_paths.discard(value["path"])
                elif item["key"] == "lfsFile":
                    if value["oid"] not in hub.lfs:
                        return self._error(422, f"LFS object {value['oid']} of {value['path']} was never uploaded")
                    files[value["path"]] = hub.lfs[value["oid"]]
                    lfs_paths.add(value["path"])
                elif item["key"] == "deletedFile":
                    if value["path"] not in files:
                        return self._error(404, "A file with this name doesn't exist", "EntryNotFound")
                    del files[value["path"]]
                    deleted.append(value["path"])
                else:
                    return self._error(400, f"fake hub: unsupported commit item {item['key']}")
            oid = hashlib.sha1(f"{r.head}{len(r.commits)}{body!r}".encode()).hexdigest()
            added = [i["value"]["path"] for i in lines[1:] if i["key"] in ("file", "lfsFile")]
            r.files, r.lfs_paths = files, lfs_paths
            r.commits.append(Commit(header["summary"], header.get("description", ""), added, deleted, oid))
            prefix = "spaces/" if r.kind == "space" else ""
            self._send(200, {"commitUrl": f"{hub.url}/{prefix}{repo}/commit/{oid}", "commitOid": oid,
                             "pullRequestUrl": None})

        def get_variables(self, body: bytes, repo: str) -> None:
            r = self._repo("spaces", repo, write=True)
            if r:
                self._send(200, r.variables)

        def add_variable(self, body: bytes, repo: str) -> None:
            r = self._repo("spaces", repo, write=True)
            if r:
                req = json.loads(body)
                r.variables[req["key"]] = {"value": req["value"], "description": req.get("description"),
                                           "updatedAt": "2026-01-01T00:00:00.000Z"}
                self._send(200, r.variables)

        def add_secret(self, body: bytes, repo: str) -> None:
            r = self._repo("spaces", repo, write=True)
            if r:
                req = json.loads(body)
                r.secrets[req["key"]] = req["value"]
                self._send(200, {})

    return Handler


ROUTES = [
    ("GET", r"/api/whoami-v2", "whoami"),
    ("POST", r"/api/repos/create", "create_repo"),
    ("POST", r"/api/validate-yaml", "validate_yaml"),
    ("GET", rf"/api/{KIND}/{REPO}/tree/(?P<rev>[^/]+)", "tree"),
    ("POST", rf"/api/{KIND}/{REPO}/preupload/(?P<rev>[^/]+)", "preupload"),
    ("POST", rf"/api/{KIND}/{REPO}/commit/(?P<rev>[^/]+)", "commit"),
    ("GET", rf"/api/{KIND}/{REPO}(?:/revision/(?P<rev>[^/]+))?", "repo_info"),
    ("POST", rf"/(?P<space>spaces/)?{REPO}\.git/info/lfs/objects/batch", "lfs_batch"),
    ("PUT", r"/lfs-upload/(?P<oid>[0-9a-f]{64})", "lfs_upload"),
    ("GET", rf"/api/spaces/{REPO}/variables", "get_variables"),
    ("POST", rf"/api/spaces/{REPO}/variables", "add_variable"),
    ("POST", rf"/api/spaces/{REPO}/secrets", "add_secret"),
]
