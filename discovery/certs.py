"""A small certificate authority for the Docker engines' TLS (``ktrdr-run certs``).

It lives in ``<state_dir>/certs/`` (mode 0700)::

    ca.pem  ca-key.pem (0600)              the CA (10 years; its key never leaves this machine)
    client-cert.pem  client-key.pem (0600) the dispatcher's client certificate (clientAuth)
    hosts/<HOST>/ca.pem server-cert.pem server-key.pem (0600)
                                           a worker's bundle, for dockerd --tlsverify

Every key is EC P-256 and written atomically (a temporary file in the same directory,
created 0600, then renamed). An existing CA is always kept; a client certificate is
issued once and again only when it expires within 30 days or was signed by another CA.
Operations take a lock on the directory, so two commands never make two CAs.
"""

from __future__ import annotations

import contextlib
import datetime
import fcntl
import ipaddress
import os
import re
import secrets
import socket
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TypedDict

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

CA_DAYS = 3650
LEAF_DAYS = 825  # about 2 years 3 months
RENEW_BEFORE = datetime.timedelta(days=30)
CLIENT_NAME = "ktrdr-run dispatcher"
_LABEL = r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
HOSTNAME_RE = re.compile(rf"(?=.{{1,253}}$){_LABEL}(?:\.{_LABEL})*")


class CertError(Exception):
    """A certificate operation failed or was asked something invalid (the message names the argument)."""


def check_hostname(name: str, what: str) -> str:
    """``name`` if it is a DNS host name (labels of letters, digits and '-'); else CertError."""
    # an all-digit last label is no host name: a mistyped address (10.0.0.300)
    if not HOSTNAME_RE.fullmatch(name) or name.rsplit(".", 1)[-1].isdigit():
        raise CertError(
            f"{what} {name!r}: not a host name (DNS labels of letters, digits and '-', separated by "
            "'.', at most 63 characters each) nor an IP address"
        )
    return name


def check_ip(text: str, what: str = "--ip") -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    try:
        return ipaddress.ip_address(text)
    except ValueError:
        raise CertError(f"{what} {text!r}: not an IP address (e.g. 10.0.0.12 or fd00::12)") from None


def server_names(
    host: str, ips: tuple[str, ...] = (), dns: tuple[str, ...] = ()
) -> tuple[list[str], list[ipaddress.IPv4Address | ipaddress.IPv6Address]]:
    """The DNS names and addresses a server certificate for ``host`` names (``host`` is
    a DNS name, or an address); CertError naming the argument that is neither."""
    addresses = [check_ip(ip, "--ip") for ip in ips]
    try:
        addresses.insert(0, ipaddress.ip_address(host))
        names = []
    except ValueError:
        names = [check_hostname(host, "HOST")]
    names += [check_hostname(name, "--dns") for name in dns]
    return list(dict.fromkeys(names)), list(dict.fromkeys(addresses))


def _atomic_write(path: Path, data: bytes, mode: int) -> None:
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)  # created 0600
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def _cert_pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def _name(common_name: str) -> x509.Name:
    attributes = [(NameOID.ORGANIZATION_NAME, "ktrdr-run"), (NameOID.COMMON_NAME, common_name)]
    return x509.Name([x509.NameAttribute(oid, value) for oid, value in attributes])


def _key_usage(*, ca: bool) -> x509.KeyUsage:
    no = dict.fromkeys(
        ("content_commitment", "key_encipherment", "data_encipherment", "key_agreement"), False
    )
    return x509.KeyUsage(
        digital_signature=True, key_cert_sign=ca, crl_sign=ca, encipher_only=False, decipher_only=False, **no
    )


def fingerprint(cert: x509.Certificate) -> str:
    """The certificate's SHA-256 fingerprint, as ``AA:BB:...``."""
    return cert.fingerprint(hashes.SHA256()).hex(":").upper()


class TlsFiles(TypedDict):
    tls_ca: str
    tls_cert: str
    tls_key: str


@dataclass(frozen=True, slots=True)
class Issued:
    """What :meth:`DockerCa.issue_server` wrote."""

    host: str
    bundle: Path
    ca: Path
    cert: Path
    key: Path
    dns: tuple[str, ...]
    ips: tuple[str, ...]
    not_after: datetime.datetime


class DockerCa:
    """The CA in ``<state_dir>/certs`` (see the module docstring for the layout)."""

    def __init__(self, state_dir: Path) -> None:
        self.root = Path(state_dir).expanduser() / "certs"
        self.ca_cert = self.root / "ca.pem"
        self.ca_key = self.root / "ca-key.pem"
        self.client_cert = self.root / "client-cert.pem"
        self.client_key = self.root / "client-key.pem"
        self.hosts = self.root / "hosts"

    def client_files(self) -> TlsFiles:
        """The ``tls_ca`` / ``tls_cert`` / ``tls_key`` config values for the dispatcher."""
        return TlsFiles(
            tls_ca=str(self.ca_cert), tls_cert=str(self.client_cert), tls_key=str(self.client_key)
        )

    @contextlib.contextmanager
    def locked(self) -> Iterator[None]:
        """Hold the directory's lock (one certificate operation at a time)."""
        self.root.mkdir(parents=True, exist_ok=True, mode=0o700)
        os.chmod(self.root, 0o700)
        with open(self.root / ".lock", "a") as handle:
            fcntl.flock(handle, fcntl.LOCK_EX)
            yield

    # --- the CA ----------------------------------------------------------------------

    def ensure_ca(self) -> bool:
        """Create the CA unless it exists (call under :meth:`locked`); True when created."""
        if self.ca_cert.is_file() and self.ca_key.is_file():
            self.load_ca()  # a damaged CA is an error, not something to replace silently
            return False
        if self.ca_cert.exists() or self.ca_key.exists():
            present = self.ca_cert if self.ca_cert.exists() else self.ca_key
            raise CertError(
                f"the CA in {self.root} is incomplete (only {present.name}): restore the missing file, "
                f"or move {self.root} away to start a new CA (every issued certificate then needs re-issuing)"
            )
        key = ec.generate_private_key(ec.SECP256R1())
        now = datetime.datetime.now(datetime.UTC)
        # a name of its own: an engine then tells another CA's certificates apart at once
        name = _name(f"ktrdr-run Docker CA {socket.gethostname()[:32]} {secrets.token_hex(4)}")
        cert = (
            x509.CertificateBuilder()
            .subject_name(name)
            .issuer_name(name)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=CA_DAYS))
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(_key_usage(ca=True), critical=True)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
            .sign(key, hashes.SHA256())
        )
        _atomic_write(self.ca_key, _key_pem(key), 0o600)
        _atomic_write(self.ca_cert, _cert_pem(cert), 0o644)
        return True

    def load_ca(self) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
        try:
            cert = x509.load_pem_x509_certificate(self.ca_cert.read_bytes())
            key = serialization.load_pem_private_key(self.ca_key.read_bytes(), password=None)
        except FileNotFoundError:
            raise CertError(f"no CA in {self.root}: run `ktrdr-run certs init` first") from None
        except (OSError, ValueError) as exc:
            raise CertError(f"cannot read the CA in {self.root}: {exc}") from None
        if not isinstance(key, ec.EllipticCurvePrivateKey) or key.public_key() != cert.public_key():
            raise CertError(f"{self.ca_key} is not the key of {self.ca_cert}")
        return cert, key

    # --- certificates ------------------------------------------------------------------

    def _leaf(
        self,
        common_name: str,
        usage: x509.ObjectIdentifier,
        sans: list[x509.GeneralName],
    ) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
        ca_cert, ca_key = self.load_ca()
        key = ec.generate_private_key(ec.SECP256R1())
        now = datetime.datetime.now(datetime.UTC)
        not_after = min(now + datetime.timedelta(days=LEAF_DAYS), ca_cert.not_valid_after_utc)
        builder = (
            x509.CertificateBuilder()
            .subject_name(_name(common_name))
            .issuer_name(ca_cert.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(not_after)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(_key_usage(ca=False), critical=True)
            .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False
            )
        )
        if sans:
            builder = builder.add_extension(x509.SubjectAlternativeName(sans), critical=False)
        return builder.sign(ca_key, hashes.SHA256()), key

    def client_is_current(self) -> bool:
        """Whether the client certificate exists, was signed by this CA, and lives 30+ days."""
        try:
            cert = x509.load_pem_x509_certificate(self.client_cert.read_bytes())
            key = serialization.load_pem_private_key(self.client_key.read_bytes(), password=None)
            ca_cert, _ = self.load_ca()
            cert.verify_directly_issued_by(ca_cert)
        except (OSError, ValueError, TypeError, InvalidSignature):
            return False
        expiring = cert.not_valid_after_utc - datetime.datetime.now(datetime.UTC) < RENEW_BEFORE
        return key.public_key() == cert.public_key() and not expiring

    def ensure_client(self) -> bool:
        """Issue the dispatcher's client certificate unless a current one exists; True when issued."""
        if self.client_is_current():
            return False
        cert, key = self._leaf(CLIENT_NAME, ExtendedKeyUsageOID.CLIENT_AUTH, [])
        _atomic_write(self.client_key, _key_pem(key), 0o600)
        _atomic_write(self.client_cert, _cert_pem(cert), 0o644)
        return True

    def issue_server(
        self, host: str, *, ips: tuple[str, ...] = (), dns: tuple[str, ...] = (), out: Path | None = None
    ) -> Issued:
        """A Docker server certificate for ``host`` (a name or an address), with ``ips``
        and ``dns`` as further names, in ``out`` (default ``hosts/<host>/``)."""
        names, addresses = server_names(host, ips, dns)
        sans: list[x509.GeneralName] = [x509.DNSName(n) for n in names]
        sans += [x509.IPAddress(a) for a in addresses]
        cert, key = self._leaf(host, ExtendedKeyUsageOID.SERVER_AUTH, sans)
        bundle = Path(out) if out is not None else self.hosts / host
        bundle.mkdir(parents=True, exist_ok=True, mode=0o700)
        issued = Issued(
            host=host,
            bundle=bundle,
            ca=bundle / "ca.pem",
            cert=bundle / "server-cert.pem",
            key=bundle / "server-key.pem",
            dns=tuple(names),
            ips=tuple(str(a) for a in addresses),
            not_after=cert.not_valid_after_utc,
        )
        _atomic_write(issued.key, _key_pem(key), 0o600)
        _atomic_write(issued.cert, _cert_pem(cert), 0o644)
        _atomic_write(issued.ca, self.ca_cert.read_bytes(), 0o644)
        return issued
