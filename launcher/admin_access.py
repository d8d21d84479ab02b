"""How the operator's commands (`fleetlm status`, `fleetlm keys`, `fleetlm up`'s wait) reach AdminService:
where the control plane is, which credentials to send, and one line for every way that can fail.

Like kubectl with its kubeconfig: flags first, then FLEETLM_ADMIN_TOKEN, then `<state>/operator.json`, which
`fleetlm up` writes (its control plane, the fleet CA, the operator certificate and the admin token file it
made), so on the machine that runs `fleetlm up` the commands need nothing else. That file's credentials are
used only for its own control plane: a --controlplane elsewhere gets only the credentials given with it.
"""

from __future__ import annotations

import argparse
import json
import os
from dataclasses import dataclass
from pathlib import Path

import grpc

OPERATOR_FILE = "operator.json"
DEFAULT_CONTROLPLANE = "127.0.0.1:50051"
CALL_TIMEOUT_SECONDS = 10.0


class AccessError(Exception):
    """A failure to reach or use AdminService: one line for the operator, no traceback."""


@dataclass(frozen=True)
class Target:
    address: str  # host:port, or several separated by commas
    tls_ca: str = ""
    tls_cert: str = ""
    tls_key: str = ""
    admin_token_file: str = ""
    admin_token: str = ""  # from FLEETLM_ADMIN_TOKEN

    @property
    def addresses(self) -> list[str]:
        return [a.strip() for a in self.address.split(",") if a.strip()] or [DEFAULT_CONTROLPLANE]


def write_operator_file(state: Path, controlplane: str, tls: dict[str, str], admin_token_file: str) -> Path:
    """What `fleetlm status` (and an operator) needs to reach the fleet `fleetlm up` runs. No secret in it:
    paths only, to files that are 0600 themselves."""
    path = state / OPERATOR_FILE
    record = {"controlplane": controlplane, **tls, "admin_token_file": admin_token_file}
    path.write_text(json.dumps(record, indent=2) + "\n")
    return path


def find_target(args: argparse.Namespace) -> Target:
    """Flags, then the environment, then `fleetlm up`'s operator file in the state directory."""
    saved: dict[str, str] = {}
    operator = Path(args.state_dir).expanduser() / OPERATOR_FILE
    if operator.is_file():
        try:
            saved = {k: str(v) for k, v in json.loads(operator.read_text()).items()}
        except (OSError, ValueError) as exc:
            raise AccessError(f"cannot read {operator}: {exc}") from None
    address = args.controlplane or saved.get("controlplane") or DEFAULT_CONTROLPLANE
    if saved.get("controlplane") != address:
        saved = {}  # that file describes another control plane: none of its credentials apply here
    env_token = os.environ.get("FLEETLM_ADMIN_TOKEN", "")
    return Target(
        address=address,
        tls_ca=args.tls_ca or saved.get("tls_ca", ""),
        tls_cert=args.tls_cert or saved.get("tls_cert", ""),
        tls_key=args.tls_key or saved.get("tls_key", ""),
        admin_token_file=args.admin_token_file or ("" if env_token else saved.get("admin_token_file", "")),
        admin_token=env_token,
    )


def channel(target: Target) -> grpc.aio.Channel:
    """A channel to the target's (single) address, with its TLS credentials when it has a CA."""
    if not target.tls_ca:
        return grpc.aio.insecure_channel(target.address)
    if not (target.tls_cert and target.tls_key):
        raise AccessError(
            "--tls-ca needs --tls-cert and --tls-key (an admin certificate: fleetlm ca issue --identity admin)"
        )
    try:
        credentials = grpc.ssl_channel_credentials(
            Path(target.tls_ca).read_bytes(), Path(target.tls_key).read_bytes(), Path(target.tls_cert).read_bytes()
        )
    except OSError as exc:
        raise AccessError(f"cannot read a TLS file: {exc}") from None
    return grpc.aio.secure_channel(target.address, credentials)


def metadata(target: Target) -> tuple[tuple[str, str], ...]:
    """The admin token as `authorization: Bearer` metadata, or nothing when there is none."""
    from mesh.auth import read_admin_token

    token = target.admin_token
    if target.admin_token_file:
        try:
            token = read_admin_token(Path(target.admin_token_file).expanduser())
        except (OSError, ValueError) as exc:
            raise AccessError(str(exc)) from None
    return (("authorization", f"Bearer {token}"),) if token else ()


def explain(target: Target, exc: grpc.aio.AioRpcError) -> str:
    """One line for a failed AdminService call: what went wrong and which flag to look at."""
    from mesh.errors import FleetError

    code = exc.code()
    where = f"the control plane at {target.address}"
    if code == grpc.StatusCode.UNAVAILABLE:
        sent = FleetError.sent_by_peer(exc)
        if sent is not None:  # the control plane itself said it (no leader yet: nothing was written)
            return f"{where} answered: {sent.message}"
        details = exc.details() or ""
        lowered = details.lower()
        if "connection refused" in lowered or "dns resolution failed" in lowered or "name or service" in lowered:
            return f"{where} does not answer ({details}); is it running? (fleetlm up, or --controlplane HOST:PORT)"
        if "handshake" in lowered or "certificate" in lowered or "ssl" in lowered:
            return (f"{where}: TLS failed ({details}); is --tls-ca the fleet CA that issued its certificate, and"
                    " does its certificate name the host you gave?")  # fmt: skip
        if "socket closed" in lowered or "connection reset" in lowered:
            if target.tls_ca:
                return (f"{where} closed the connection during TLS ({details}): it refused the client certificate"
                        " (--tls-cert/--tls-key: fleetlm ca issue --identity admin, from its fleet CA), or it"
                        " serves plaintext (then leave out --tls-ca)")  # fmt: skip
            return (f"{where} closed the plaintext connection ({details}): it serves TLS; give --tls-ca, --tls-cert"
                    " and --tls-key (an admin certificate: fleetlm ca issue --identity admin)")  # fmt: skip
        how = "over TLS" if target.tls_ca else "in plaintext"
        return (f"{where} does not answer {how} ({details}); is it running?"
                " (fleetlm up, or --controlplane HOST:PORT)")  # fmt: skip
    if code == grpc.StatusCode.DEADLINE_EXCEEDED:
        return f"{where} did not answer within {CALL_TIMEOUT_SECONDS:g}s"
    if code in (grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.PERMISSION_DENIED):
        refused = FleetError.from_rpc_error(exc).message
        return (f"{where} refused the credentials: {refused}"
                " (--admin-token-file, FLEETLM_ADMIN_TOKEN, --tls-cert/--tls-key)")  # fmt: skip
    if code == grpc.StatusCode.UNIMPLEMENTED:  # an edge or a node, say: it serves no AdminService
        return (f"{where} is not a control plane (it does not serve AdminService); give the control plane's"
                " address (--controlplane HOST:PORT)")  # fmt: skip
    return f"{where} answered {code.name}: {FleetError.from_rpc_error(exc).message}"
