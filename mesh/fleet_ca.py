"""The fleet's certificate authority: one EC P-256 key and a self-signed certificate in a state directory,
which signs the certificates every component presents (server and client alike).

Identity lives in a URI SAN, `spiffe://fleetlm/<kind>/<id>` (node, controlplane, edge, admin), so a servicer
learns who calls from the verified peer certificate alone. A node's certificate also carries the DNS name
`<id>.node.fleetlm`, which the edge dials nodes by (`grpc.ssl_target_name_override`): grpc's hostname check
then proves that the node answering is the node the routing table names. Everything here is `cryptography`;
nothing is home-made. Private keys are written 0600 and never logged.
"""

from __future__ import annotations

import datetime
import hashlib
import ipaddress
import os
import re
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from mesh import durations

TRUST_DOMAIN = "fleetlm"
KINDS = ("node", "controlplane", "edge", "admin")
CA_CERT = "ca.crt"
CA_KEY = "ca.key"
CA_DAYS = 3650
LEAF_DAYS = 30


def identity_uri(kind: str, name: str = "") -> str:
    if kind not in KINDS:
        raise ValueError(f"identity kind must be one of {', '.join(KINDS)}, not {kind!r}")
    if kind != "admin" and (not name or "/" in name):
        raise ValueError(f"a {kind} identity needs a name without '/'")
    return f"spiffe://{TRUST_DOMAIN}/{kind}" + (f"/{name}" if name else "")


_DNS_LABEL = re.compile(r"[A-Za-z0-9_](?:[A-Za-z0-9_-]{0,61}[A-Za-z0-9_])?")


def check_dns_name(name: str) -> str:
    """`name` when it is a DNS name a certificate can carry (labels of ASCII letters, digits, '-' and '_', at
    most 63 characters each, 253 in all; a leading '*.' for a wildcard), else ValueError naming it."""
    labels = name.removeprefix("*.").split(".")
    if len(name) > 253 or not all(_DNS_LABEL.fullmatch(label) for label in labels):
        raise ValueError(
            f"{name!r} is not a DNS name: labels of ASCII letters, digits and '-' (not first or last), at most"
            " 63 characters each, separated by dots; '*.' may lead"
        )
    return name


def check_identity_name(kind: str, name: str) -> str:
    """`name` when it can name a `kind` in the fleet: one or more DNS labels (a node's certificate carries it
    as `<name>.node.fleetlm`), else ValueError naming it."""
    try:
        if name.startswith("*"):
            raise ValueError("a wildcard")
        check_dns_name(name)
    except ValueError:
        raise ValueError(
            f"the {kind} id {name!r} must be ASCII letters, digits, '-', '_' and '.', as a host name is"
        ) from None
    return name


def node_dns_name(node_id: str) -> str:
    """The DNS SAN of a node's certificate, which the edge verifies as the node's name."""
    return f"{node_id}.node.{TRUST_DOMAIN}"


# The DNS name in every control plane's certificate from the fleet CA: what a node verifies a control plane by
# when it dials one by address (several given, or a name resolved to its records), which no per-host name fits.
CONTROLPLANE_DNS_NAME = f"controlplane.{TRUST_DOMAIN}"


def fingerprint(cert_pem: bytes) -> str:
    """`sha256:<hex>` of the certificate's DER encoding (what `--ca-fingerprint` pins)."""
    der = x509.load_pem_x509_certificate(cert_pem).public_bytes(serialization.Encoding.DER)
    return "sha256:" + hashlib.sha256(der).hexdigest()


def uri_identities(cert: x509.Certificate) -> list[str]:
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return []
    return [u for u in san.get_values_for_type(x509.UniformResourceIdentifier) if u.startswith("spiffe://")]


def new_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def write_private(path: Path, data: bytes) -> None:
    """Write a secret file 0600 from its creation (never readable by others, not even for a moment), then
    move it into place, so a reader (a rotating server) never sees half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as out:
        out.write(data)
    os.replace(tmp, path)


def write_public(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def _sans(identity: str, dns_names: list[str], ips: list[str]) -> x509.SubjectAlternativeName:
    names: list[x509.GeneralName] = [x509.UniformResourceIdentifier(identity)]
    names += [x509.DNSName(d) for d in dns_names]
    names += [x509.IPAddress(ipaddress.ip_address(i)) for i in ips]
    return x509.SubjectAlternativeName(names)


@dataclass
class FleetCA:
    cert: x509.Certificate
    key: ec.EllipticCurvePrivateKey

    @property
    def cert_pem(self) -> bytes:
        return self.cert.public_bytes(serialization.Encoding.PEM)

    @property
    def fingerprint(self) -> str:
        return fingerprint(self.cert_pem)

    @classmethod
    def create(cls, directory: Path, days: int = CA_DAYS) -> FleetCA:
        """A new CA in `directory`; refuses to replace one (every certificate it signed would stop working)."""
        if (directory / CA_KEY).exists():
            raise FileExistsError(f"a fleet CA already exists in {directory}")
        key = new_key()
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "fleetlm fleet CA")])
        now = datetime.datetime.now(datetime.UTC)
        cert = (
            x509.CertificateBuilder()
            .subject_name(name)
            .issuer_name(name)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=days))
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(x509.KeyUsage(False, False, False, False, False, True, True, False, False), critical=True)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
            .sign(key, hashes.SHA256())
        )
        ca = cls(cert, key)
        write_private(directory / CA_KEY, key_pem(key))
        write_public(directory / CA_CERT, ca.cert_pem)
        return ca

    @classmethod
    def load(cls, directory: Path) -> FleetCA:
        cert = x509.load_pem_x509_certificate((directory / CA_CERT).read_bytes())
        key = serialization.load_pem_private_key((directory / CA_KEY).read_bytes(), password=None)
        if not isinstance(key, ec.EllipticCurvePrivateKey):
            raise ValueError(f"{directory / CA_KEY} is not an EC private key")
        return cls(cert, key)

    @classmethod
    def load_or_create(cls, directory: Path) -> FleetCA:
        return cls.load(directory) if (directory / CA_KEY).exists() else cls.create(directory)

    def sign(
        self,
        public_key: ec.EllipticCurvePublicKey,
        identity: str,
        dns_names: list[str] | None = None,
        ips: list[str] | None = None,
        days: float = LEAF_DAYS,
        not_before: datetime.datetime | None = None,
    ) -> x509.Certificate:
        """A leaf certificate for `identity` (usable as server and as client: every fleet component is both).
        It starts a little before now, for clocks behind the CA's: 5 minutes, or a tenth of a short lifetime
        (a node certificate of minutes, for a renewal test), which must not start out mostly spent."""
        if not 0 < days < float("inf"):  # NaN too
            raise ValueError(f"a certificate's lifetime must be a positive number of days; got {days}")
        try:
            lifetime = datetime.timedelta(days=days)
        except OverflowError:
            raise ValueError(f"a certificate's lifetime of {days} days is beyond any date") from None
        now = datetime.datetime.now(datetime.UTC)
        start = not_before or now - min(datetime.timedelta(minutes=5), lifetime / 10)
        if start + lifetime > datetime.datetime.fromtimestamp(durations.LAST_TIMESTAMP_SECONDS, datetime.UTC):
            raise ValueError(f"a certificate's lifetime of {days} days ends after the year 9999")
        return (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, identity)]))
            .issuer_name(self.cert.subject)
            .public_key(public_key)
            .serial_number(x509.random_serial_number())
            .not_valid_before(start)
            .not_valid_after(start + lifetime)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.KeyUsage(True, False, False, False, False, False, False, False, False), critical=True)
            .add_extension(
                x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]),
                critical=False,
            )
            .add_extension(_sans(identity, dns_names or [], ips or []), critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(self.key.public_key()), critical=False)
            .sign(self.key, hashes.SHA256())
        )

    def issue(
        self, identity: str, dns_names: list[str] | None = None, ips: list[str] | None = None, days: float = LEAF_DAYS
    ) -> tuple[bytes, bytes]:
        """A new key and its certificate, as (certificate PEM, key PEM). A node's carries its DNS name too, and
        a control plane's CONTROLPLANE_DNS_NAME."""
        for name in dns_names or []:
            check_dns_name(name)
        node_prefix = identity_uri("node", "-")[:-1]
        if identity.startswith(node_prefix):
            dns_names = [*(dns_names or []), node_dns_name(identity.removeprefix(node_prefix))]
        elif identity.startswith(identity_uri("controlplane", "-")[:-1]):
            dns_names = [*(dns_names or []), CONTROLPLANE_DNS_NAME]
        key = new_key()
        cert = self.sign(key.public_key(), identity, dns_names, ips, days)
        ca_end = self.cert.not_valid_after_utc
        if cert.not_valid_after_utc > ca_end:  # TLS would refuse it from then on: say so now
            raise ValueError(
                f"a certificate of {days:g} days would outlive the fleet CA, which expires {ca_end:%Y-%m-%d}"
                f" (at most {(ca_end - datetime.datetime.now(datetime.UTC)).days} days)"
            )
        return cert.public_bytes(serialization.Encoding.PEM), key_pem(key)

    def sign_csr(self, csr_pem: bytes, identity: str, dns_names: list[str], days: float = LEAF_DAYS) -> bytes:
        """Sign a CSR's key for `identity`. What the CSR asks for beyond its key is ignored: the identity and
        names come from the caller (the join token's check), never from the requester."""
        csr = x509.load_pem_x509_csr(csr_pem)
        if not csr.is_signature_valid:
            raise ValueError("the CSR's signature does not verify")
        public_key = csr.public_key()
        if not isinstance(public_key, ec.EllipticCurvePublicKey) or public_key.curve.name != "secp256r1":
            raise ValueError("the CSR's key must be EC P-256")
        return self.sign(public_key, identity, dns_names, [], days).public_bytes(serialization.Encoding.PEM)


def make_csr(key: ec.EllipticCurvePrivateKey, common_name: str) -> bytes:
    csr = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)]))
        .sign(key, hashes.SHA256())
    )
    return csr.public_bytes(serialization.Encoding.PEM)
