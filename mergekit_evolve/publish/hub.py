"""Push a run's winner to the Hugging Face Hub: the model repo in one commit, then its demo Space.

The token comes from ``HF_TOKEN`` or the stored login (``huggingface_hub.get_token``) and goes only
into the HTTP client: it is never printed, logged or written, and error messages are scrubbed of it.
Nothing here writes to the run folder, so a failed push can simply be run again.
"""

from __future__ import annotations

import logging
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from huggingface_hub import (
    CommitOperationAdd,
    CommitOperationDelete,
    HfApi,
    constants,
    get_token,
)
from huggingface_hub.errors import HfHubHTTPError

from mergekit_evolve.publish.card import build_card, objective_md
from mergekit_evolve.publish.errors import PublishError
from mergekit_evolve.publish.gradio_app import MODEL_VARIABLE, space_files
from mergekit_evolve.publish.names import TEXT_SUFFIXES
from mergekit_evolve.publish.run_files import RunFiles
from mergekit_evolve.recipe.publish_settings import PublishSettings
from mergekit_evolve.runfolder import CARD_FILE, CONFIG_FILE, RECIPE_FILE

try:  # the HTTP client huggingface_hub 2.x uses; 1.x used httpx
    from httpx2 import TransportError
except ImportError:  # pragma: no cover - depends on the installed huggingface_hub
    from httpx import TransportError

LOG = logging.getLogger(__name__)
KEEP = {".gitattributes"}  # never deleted from a repo, whatever the upload holds
REPO_TYPES = ("model", "space")  # also the dry run's folder names


@dataclass
class RepoUpload:
    repo_id: str
    repo_type: str  # "model" or "space"
    files: dict[str, Path | bytes]  # path in the repo -> local file or content
    commit_message: str
    commit_description: str = ""
    variables: dict[str, str] = field(default_factory=dict)


@dataclass
class PublishPlan:
    run_dir: Path
    private: bool
    uploads: list[RepoUpload]


def plan_publish(run_dir: Path, repo: str, space: str | None = None, private: bool = False,
                 license: str | None = None) -> PublishPlan:
    """Everything that would be uploaded, built in memory from the run folder (which is only read)."""
    run = RunFiles(Path(run_dir))
    run.check()
    license = license or _license(run)
    files: dict[str, Path | bytes] = {
        p.relative_to(run.best).as_posix(): p for p in sorted(run.best.rglob("*")) if p.is_file()
    }
    # The card names the repo in its usage snippet, so it is rendered for this repo rather than read from best/.
    files[CARD_FILE] = (str(build_card(run, repo, license)) + "\n").encode()
    files[CONFIG_FILE] = run.published_config().encode()
    files[RECIPE_FILE] = run.published_recipe().encode()
    for name, path in run.plots().values():  # a run folder whose card predates its plots
        files.setdefault(name, path)
    winner = run.report["winner"]
    uploads = [RepoUpload(
        repo_id=repo,
        repo_type="model",
        files=files,
        commit_message=f"mergekit-evolve: winner of {run.name} (trial {winner['trial']}, "
                       f"held-out {winner['heldout']:.4f})",
        commit_description=f"Objective {objective_md(run)}; {run.report['trials']} trials; "
                           f"sources: {', '.join(map(run.names.name, run.sources))}.",
    )]
    if space:
        uploads.append(RepoUpload(
            repo_id=space,
            repo_type="space",
            files=space_files(run, repo, space, private, license),
            commit_message=f"mergekit-evolve: demo of {repo}",
            variables={MODEL_VARIABLE: repo},
        ))
    for up in uploads:
        up.files = {name: _scrubbed(run, src) for name, src in up.files.items()}
    return PublishPlan(Path(run_dir), private, uploads)


def _license(run: RunFiles) -> str:
    license, why = run.license()
    if license is None:
        raise PublishError(
            f"no license for the model card: {why}. Set publish.license in the recipe or pass --license "
            "(the sources' license when they share one; 'other' with a LICENSE file otherwise)"
        )
    LOG.info("license %s: %s", license, why)
    return license


def _scrubbed(run: RunFiles, src: Path | bytes) -> Path | bytes:
    """A text file with this machine's paths of the source models replaced by their published names."""
    if isinstance(src, Path) and (not src.name.endswith(TEXT_SUFFIXES) or src.stat().st_size > 50_000_000):
        return src
    text = src.decode() if isinstance(src, bytes) else src.read_text(encoding="utf-8")
    clean = run.names.scrub(text, run.sources)
    if clean == text:
        return src
    return clean.encode()


def describe(plan: PublishPlan) -> str:
    lines = []
    for up in plan.uploads:
        lines.append(f"{up.repo_type} repo {up.repo_id} ({'private' if plan.private else 'public'} if created), "
                     f"one commit: {up.commit_message}")
        for name, src in sorted(up.files.items()):
            size = len(src) if isinstance(src, bytes) else src.stat().st_size
            lines.append(f"  {name:<40} {size:>12,d} bytes")
        lines.append(f"  files already in the repo and not listed here are deleted (except {', '.join(sorted(KEEP))})")
        lines += [f"  Space variable {k}={v}" for k, v in up.variables.items()]
    return "\n".join(lines)


def write_plan(plan: PublishPlan, out: Path) -> None:
    """A dry run: the exact files of each upload under ``out/model`` and ``out/space``; no network."""
    if out.exists() and not out.is_dir():
        raise PublishError(f"--dry-run {out}: a file is in the way")
    if out.exists() and {p.name for p in out.iterdir()} - set(REPO_TYPES):
        raise PublishError(f"--dry-run {out}: the folder holds other files; give an empty or new folder")
    for up in plan.uploads:
        root = out / up.repo_type
        if root.exists():
            shutil.rmtree(root)
        for name, src in up.files.items():
            dest = root / name
            dest.parent.mkdir(parents=True, exist_ok=True)
            if isinstance(src, bytes):
                dest.write_bytes(src)
            else:
                shutil.copyfile(src, dest)


def resolve_token() -> str:
    """The token to publish with; also refuses offline mode, so a run with ``publish:`` can check both up front."""
    if constants.is_offline_mode():
        raise PublishError("HF_HUB_OFFLINE is set, so nothing can be sent to the Hub: unset it to publish")
    token = get_token()
    if not token:
        raise PublishError("no Hugging Face token: set HF_TOKEN to a token with write access, or run `hf auth login`")
    return token


def push(plan: PublishPlan, endpoint: str | None = None, token: str | None = None) -> list[str]:
    """Create or update every repo of ``plan``; returns their URLs."""
    token = token or resolve_token()
    api = HfApi(endpoint=endpoint, token=token)
    with _explained("checking the token", None, plan.run_dir, token):
        user = api.whoami()["name"]
    LOG.info("publishing to %s as %s", api.endpoint, user)
    urls = []
    for up in plan.uploads:
        with _explained("creating", up.repo_id, plan.run_dir, token):
            url = api.create_repo(
                up.repo_id, repo_type=up.repo_type, private=plan.private, exist_ok=True,
                space_sdk="gradio" if up.repo_type == "space" else None,
            )
        with _explained("uploading to", up.repo_id, plan.run_dir, token):
            stale = [f for f in api.list_repo_files(up.repo_id, repo_type=up.repo_type)
                     if f not in up.files and f not in KEEP]
            ops = [CommitOperationDelete(f) for f in stale] + [
                CommitOperationAdd(name, src if isinstance(src, bytes) else str(src))
                for name, src in sorted(up.files.items())
            ]
            commit = api.create_commit(
                up.repo_id, ops, repo_type=up.repo_type,
                commit_message=up.commit_message, commit_description=up.commit_description,
            )
        LOG.info("%s %s: %s (%d files, %d deleted)", up.repo_type, up.repo_id, commit.commit_url, len(up.files),
                 len(stale))
        with _explained("setting the variables of", up.repo_id, plan.run_dir, token):
            for key, value in up.variables.items():
                api.add_space_variable(up.repo_id, key, value, description="model repo the demo loads")
        urls.append(str(url))
    return urls


@contextmanager
def _explained(doing: str, repo_id: str | None, run_dir: Path, token: str) -> Iterator[None]:
    """Turn what the Hub or the network raised into a PublishError saying what, where and what next."""
    try:
        yield
    # HfHubHTTPError is an OSError; huggingface_hub raises ValueError/RuntimeError around failed uploads.
    except (OSError, ValueError, RuntimeError, TransportError) as error:
        where = f"{doing} {repo_id}" if repo_id else doing
        message = (
            f"{_reason(error, repo_id)} (while {where}). "
            f"Nothing in {run_dir} was changed; run the same command again to retry."
        )
        raise PublishError(message.replace(token, "***")) from None


def _reason(error: BaseException, repo_id: str | None) -> str:
    cause: BaseException | None = error
    while cause is not None:  # huggingface_hub wraps upload failures in RuntimeErrors
        if isinstance(cause, HfHubHTTPError):
            return _http_reason(cause, repo_id)
        if isinstance(cause, TransportError):
            return f"network error: {cause}"
        cause = cause.__cause__
    return f"{type(error).__name__}: {error}"


def _http_reason(error: HfHubHTTPError, repo_id: str | None) -> str:
    status = error.response.status_code
    said = f" The Hub said: {error.server_message.strip()}" if error.server_message else ""
    if status == 401 and repo_id is None:
        return ("the Hub rejected the token (401 Unauthorized): it is invalid or has expired; "
                "create a new one with write access and set HF_TOKEN, or run `hf auth login`")
    if status in (401, 403):
        return (
            f"no write access to {repo_id} ({status}): the name belongs to another user or organisation, or the token "
            f"cannot write there; pick a name in your own namespace or use a token with write access.{said}"
        )
    return f"the Hub answered {status}.{said}"


def publish_run(run_dir: Path, settings: PublishSettings, endpoint: str | None = None) -> list[str]:
    """The recipe's ``publish:`` push at the end of a run."""
    urls = push(plan_publish(run_dir, settings.repo, settings.space, settings.private), endpoint)
    for url in urls:
        LOG.info("published: %s", url)
    return urls
