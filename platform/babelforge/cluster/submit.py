"""Submit babelforge jobs to a Ray cluster and follow them: a thin layer over Ray's Jobs SDK.

A job is a shell command (``python jobs/<stage>.py --config jobs/configs/<stage>.yaml ...``) run
on the cluster's head node in a runtime environment. :func:`build_runtime_env` makes the one
babelforge jobs need, the same as ``ray job submit --working-dir . --runtime-env-json ...``:

- ``working_dir``: the repository (jobs/, their configs, serve/), uploaded without local state
  (:data:`DEFAULT_EXCLUDES`: ``.venv``, ``runs/``, ``outputs/``, caches; ``.gitignore`` is
  honoured by Ray as well);
- ``py_modules``: the working tree's ``platform/babelforge`` package, so the cluster runs the code
  being submitted rather than whatever babelforge version its image has installed;
- ``env_vars``: for a cluster on this machine (every node on a loopback IP),
  ``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0``, so the job's Ray processes and gloo stay on loopback (see
  :mod:`babelforge.utils.ray_env`);
- optional ``pip`` requirements, and anything given as a runtime-env JSON.

:class:`JobRunner` submits, follows the logs (``tail_job_logs``), polls the status until it is
terminal and returns a :class:`JobOutcome`; a FAILED job's outcome names its error (the
``babelforge <command>: error: ...`` line babelforge jobs print, or the exception)::

    >>> runner = JobRunner("http://127.0.0.1:8265")                                   # doctest: +SKIP
    >>> env = build_runtime_env(".", local=runner.local)                               # doctest: +SKIP
    >>> outcome = runner.run(stage_entrypoint("ingest"), env)                          # doctest: +SKIP
    >>> outcome.status, outcome.succeeded                                              # doctest: +SKIP
    ('SUCCEEDED', True)

Addresses follow Ray's rules: ``RAY_API_SERVER_ADDRESS`` or ``RAY_ADDRESS`` in the environment win
over the ``address`` argument; no address at all finds a cluster running on this machine. A cluster
with token authentication needs ``RAY_AUTH_MODE=token`` and the token (``RAY_AUTH_TOKEN``, or
``~/.ray/auth_token``); to a loopback address the local token is sent without asking, as Ray
itself does for clusters it finds on this machine.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import os
import re
import shlex
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence
from urllib.parse import urlsplit

from babelforge.errors import BabelforgeError, ConfigError

log = logging.getLogger(__name__)

__all__ = ["JobRunner", "JobOutcome", "JobSubmitError", "build_runtime_env", "stage_entrypoint",
           "is_local_address", "DEFAULT_EXCLUDES", "TERMINAL_STATUSES"]

DEFAULT_EXCLUDES: tuple[str, ...] = (".git", ".venv", "runs/", "outputs/", "__pycache__", "*.pyc", "*.egg-info",
                                     ".pytest_cache", ".ruff_cache")
TERMINAL_STATUSES = frozenset({"SUCCEEDED", "FAILED", "STOPPED"})
PACKAGE_DIR = "platform/babelforge"

# stage -> entry point under jobs/ where the file is not named after the stage
_JOB_SCRIPTS: dict[str, str] = {"eval": "evaluate", "run": "pipeline"}
_LOOPBACK_SWITCH = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"
_JOB_ERROR_LINE = re.compile(r"^babelforge [\w-]+: error: .+")   # what babelforge commands and jobs print
_EXCEPTION_LINE = re.compile(r"^[A-Za-z_][\w.]*(Error|Exception|Interrupt|Exit)\b(: .*)?$")


class JobSubmitError(BabelforgeError):
    """A job could not be submitted, found or followed (the message says which and why)."""


@dataclass(frozen=True)
class JobOutcome:
    """Where a submitted job stands (final once ``status`` is in :data:`TERMINAL_STATUSES`)."""

    submission_id: str
    status: str
    message: str = ""
    exit_code: int | None = None

    @property
    def terminal(self) -> bool:
        return self.status in TERMINAL_STATUSES

    @property
    def succeeded(self) -> bool:
        return self.status == "SUCCEEDED"

    @property
    def error(self) -> str | None:
        """The line that says why a FAILED or STOPPED job ended (None while it runs or when it succeeded)."""
        if self.status not in ("FAILED", "STOPPED"):
            return None
        return summarize_failure(self.message)

    def describe(self) -> str:
        """One line for the terminal: ``job <id> FAILED (exit code 2): babelforge ingest: error: ...``."""
        code = f" (exit code {self.exit_code})" if self.exit_code not in (None, 0) else ""
        error = self.error
        return f"job {self.submission_id} {self.status}{code}" + (f": {error}" if error else "")


def summarize_failure(message: str) -> str:
    """What a failed job's status message (which ends with the driver's last logs) says went wrong.

    That is the last ``babelforge <command>: error: ...`` line with its indented detail lines (a config error
    lists one bad key per line), else the last exception line, else the last line.
    """
    lines = [line.rstrip() for line in message.splitlines() if line.strip()]
    for pattern in (_JOB_ERROR_LINE, _EXCEPTION_LINE):
        found = [i for i, line in enumerate(lines) if pattern.match(line)]
        if found:
            start = end = found[-1]
            while end + 1 < len(lines) and lines[end + 1].startswith((" ", "\t")):
                end += 1
            return "\n".join(lines[start:end + 1])
    return lines[-1].strip() if lines else "no message"


def is_local_address(address: str | None) -> bool:
    """Whether ``address`` (a URL, ``host:port``, an IP, ``auto`` or None) points at this machine."""
    if address in (None, "", "auto", "local"):
        return True
    host = urlsplit(address if "://" in address else f"//{address}").hostname or ""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def effective_address(address: str | None) -> str | None:
    """The address Ray's Jobs SDK will use: its environment variables win over the argument."""
    return os.environ.get("RAY_API_SERVER_ADDRESS") or os.environ.get("RAY_ADDRESS") or address


def local_auth_headers() -> dict[str, str]:
    """The bearer token of clusters started on this machine (Ray enables token auth when one exists)."""
    if os.environ.get("RAY_AUTH_MODE", "").lower() == "disabled":
        return {}
    token = os.environ.get("RAY_AUTH_TOKEN", "").strip()
    if not token:
        path = Path(os.environ.get("RAY_AUTH_TOKEN_PATH") or Path.home() / ".ray" / "auth_token")
        token = path.read_text(encoding="utf-8").strip() if path.is_file() else ""
    return {"Authorization": f"Bearer {token}"} if token else {}


def build_runtime_env(working_dir: str | Path = ".", *, local: bool, base: dict[str, Any] | None = None,
                      pip: Sequence[str] = (), env_vars: dict[str, str] | None = None,
                      ship_package: bool = True) -> dict[str, Any]:
    """The runtime environment of a babelforge job submitted from ``working_dir`` (the repository).

    ``base`` (e.g. from ``--runtime-env-json``) wins over every default here except ``excludes``,
    which are merged. ``pip`` entries are requirement specifiers, or one path to a requirements file.
    ``local`` adds the loopback switch for a cluster on this machine.
    """
    root = Path(working_dir).resolve()
    if not root.is_dir():
        raise ConfigError(f"working dir {root} is not a directory")
    env: dict[str, Any] = {"working_dir": str(root)}
    package = root / PACKAGE_DIR
    if ship_package and package.is_dir():
        env["py_modules"] = [str(package)]
    if pip:
        requirements = list(pip)
        if len(requirements) == 1 and requirements[0].endswith(".txt"):
            path = Path(requirements[0])
            if not path.is_file():
                raise ConfigError(f"--pip: requirements file {path} does not exist")
            env["pip"] = str(path.resolve())
        else:
            env["pip"] = requirements
    variables = {_LOOPBACK_SWITCH: "0"} if local else {}
    variables.update(env_vars or {})
    if variables:
        env["env_vars"] = variables
    base = dict(base or {})
    excludes = list(dict.fromkeys([*DEFAULT_EXCLUDES, *base.pop("excludes", [])]))
    if isinstance(base.get("env_vars"), dict):
        base["env_vars"] = {**variables, **base["env_vars"]}
    return {**env, **base, "excludes": excludes}


def stage_entrypoint(stage: str, config: str | None = None, overrides: Sequence[str] = (),
                     working_dir: str | Path = ".") -> list[str]:
    """``python jobs/<stage>.py --config jobs/configs/<stage>.yaml [--set k=v ...]`` for a stage name.

    ``eval`` runs ``jobs/evaluate.py`` and ``run`` runs ``jobs/pipeline.py`` (with ``pipeline.yaml``).
    Entry points and default configs are looked up in ``working_dir``, so stages added to ``jobs/``
    later work without changes here. A stage without a default config (e.g. ``train``, which has
    presets) needs ``config``.
    """
    root = Path(working_dir)
    job = _JOB_SCRIPTS.get(stage, stage)
    script = f"jobs/{job}.py"
    if not (root / script).is_file():
        known = sorted(p.stem for p in (root / "jobs").glob("*.py"))
        raise ConfigError(f"--stage {stage}: no entry point {script} in {root.resolve()} (jobs: {', '.join(known)})")
    if config is None:
        defaults = [f"jobs/configs/{name}.yaml" for name in dict.fromkeys((stage, job))]
        config = next((path for path in defaults if (root / path).is_file()), None)
        if config is None:
            candidates = sorted(str(p.relative_to(root)) for p in (root / "jobs/configs").glob(f"{stage}*.yaml"))
            hint = f"; one of: {', '.join(candidates)}" if candidates else ""
            raise ConfigError(f"--stage {stage}: no default config {' or '.join(defaults)}; pass --config{hint}")
    elif not (root / config).is_file():
        raise ConfigError(f"--config {config}: no such file in {root.resolve()}")
    command = ["python", script, "--config", config]
    for override in overrides:
        command += ["--set", override]
    return command


def _write_stdout(text: str) -> None:
    sys.stdout.write(text)
    sys.stdout.flush()


class JobRunner:
    """Submits and follows jobs on one cluster (the Ray Jobs SDK's ``JobSubmissionClient``)."""

    def __init__(self, address: str | None = None) -> None:
        from ray.job_submission import JobSubmissionClient

        resolved = effective_address(address)
        self._headers = local_auth_headers() if is_local_address(resolved) else {}
        try:
            self.client = JobSubmissionClient(address, headers=self._headers or None)
        except (ConnectionError, RuntimeError, ValueError) as err:   # AuthenticationError is a RuntimeError
            where = resolved or "a local cluster (none running?)"
            raise JobSubmitError(f"cannot reach the Ray Jobs API at {where}: {err}") from err
        self.address = self.client.get_address()
        self.local = self._all_nodes_on_loopback()

    def _all_nodes_on_loopback(self) -> bool:
        """Whether the cluster runs on this machine: every alive node has a loopback IP (Ray's State API).

        The address alone cannot tell: a remote dashboard reached through a port forward is on
        127.0.0.1 too, and pinning its multi-node jobs to loopback would break them.
        """
        from ray.util.state.api import StateApiClient
        from ray.util.state.common import ListApiOptions, StateResource

        try:
            nodes = StateApiClient(self.address, headers=self._headers or None).list(
                StateResource.NODES, options=ListApiOptions(detail=False), raise_on_missing_output=False)
        except Exception as err:  # an older or restricted dashboard: treat the cluster as remote
            log.debug("cannot list the nodes of %s: %s", self.address, err)
            return False
        ips = [node.node_ip for node in nodes if node.state == "ALIVE"]
        return bool(ips) and all(is_local_address(ip) for ip in ips)

    def submit(self, entrypoint: str | Sequence[str], runtime_env: dict[str, Any], *,
               submission_id: str | None = None, metadata: dict[str, str] | None = None) -> str:
        """Start a job; returns its submission id."""
        command = entrypoint if isinstance(entrypoint, str) else shlex.join(entrypoint)
        try:
            job_id = self.client.submit_job(entrypoint=command, runtime_env=runtime_env,
                                            submission_id=submission_id, metadata=metadata)
        except (RuntimeError, ValueError, OSError) as err:
            raise JobSubmitError(f"submitting `{command}` to {self.address} failed: {err}") from err
        log.info("submitted %s to %s: %s", job_id, self.address, command)
        return job_id

    def status(self, submission_id: str) -> JobOutcome:
        """The job's current status (and, once it ended, its message and driver exit code)."""
        try:
            info = self.client.get_job_info(submission_id)
        except RuntimeError as err:
            raise JobSubmitError(f"job {submission_id}: {err}") from err
        return JobOutcome(submission_id, str(info.status.value), info.message or "", info.driver_exit_code)

    def logs(self, submission_id: str) -> str:
        """Everything the job's driver has printed so far."""
        try:
            return self.client.get_job_logs(submission_id)
        except RuntimeError as err:
            raise JobSubmitError(f"job {submission_id}: {err}") from err

    def follow(self, submission_id: str, write: Callable[[str], Any] | None = None,
               timeout_s: float | None = None) -> None:
        """Stream the job's logs to ``write`` (default: this process's stdout) until the job ends."""

        async def tail() -> None:
            async for chunk in self.client.tail_job_logs(submission_id):
                (write or _write_stdout)(chunk)

        try:
            asyncio.run(asyncio.wait_for(tail(), timeout_s))
        except asyncio.TimeoutError as err:
            raise JobSubmitError(f"job {submission_id} still running after {timeout_s:.0f}s") from err
        except RuntimeError as err:   # the log stream broke off; the status poll that follows still applies
            log.warning("log stream of %s ended early: %s", submission_id, err)

    def wait(self, submission_id: str, timeout_s: float | None = None, poll_interval_s: float = 1.0) -> JobOutcome:
        """Poll until the job is SUCCEEDED, FAILED or STOPPED."""
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        while True:
            outcome = self.status(submission_id)
            if outcome.terminal:
                return outcome
            if deadline is not None and time.monotonic() > deadline:
                raise JobSubmitError(f"job {submission_id} is still {outcome.status} after {timeout_s:.0f}s")
            time.sleep(poll_interval_s)

    def stop(self, submission_id: str, timeout_s: float | None = 60.0) -> JobOutcome:
        """Ask the job to stop (SIGTERM, then SIGKILL after Ray's grace period) and wait until it ended."""
        try:
            self.client.stop_job(submission_id)
        except RuntimeError as err:
            raise JobSubmitError(f"job {submission_id}: {err}") from err
        return self.wait(submission_id, timeout_s=timeout_s)

    def watch(self, submission_id: str, *, follow: bool = True, timeout_s: float | None = None,
              write: Callable[[str], Any] | None = None) -> JobOutcome:
        """Follow the logs (optional) until the job ends and return its final outcome."""
        started = time.monotonic()
        if follow:
            self.follow(submission_id, write, timeout_s=timeout_s)
        remaining = None if timeout_s is None else max(1.0, timeout_s - (time.monotonic() - started))
        return self.wait(submission_id, timeout_s=remaining)

    def run(self, entrypoint: str | Sequence[str], runtime_env: dict[str, Any], *, follow: bool = True,
            timeout_s: float | None = None, submission_id: str | None = None,
            write: Callable[[str], Any] | None = None) -> JobOutcome:
        """Submit, follow the logs (optional) and return the final outcome."""
        job_id = self.submit(entrypoint, runtime_env, submission_id=submission_id)
        return self.watch(job_id, follow=follow, timeout_s=timeout_s, write=write)
