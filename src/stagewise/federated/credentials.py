"""The keys a federation needs, made with `cryptography` (what Flower itself uses).

- The coordinating site's TLS certificates: a private certificate authority and a server
  certificate for the addresses the hospitals connect to. Each hospital gets `ca.pem` only,
  and its SuperNode refuses a server that cannot prove it holds the matching key.
- Each hospital's node key: an elliptic-curve (P-384) key pair in OpenSSH format, the format
  Flower's SuperNode authentication reads. The private key never leaves the hospital; the
  public key is given to the coordinator, whose SuperLink then admits that node and no other.
"""

from __future__ import annotations

import datetime
import ipaddress
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from stagewise.io import atomic_write

CA_FILE, SERVER_CERT, SERVER_KEY = "ca.pem", "server.pem", "server.key"
LOOPBACK = ["127.0.0.1", "localhost"]
"""Always in the server certificate: the coordinator's own programs (the `flwr` CLI that
admits the keys, the ServerApp) reach its SuperLink on this machine."""


def _write(path: Path, data: bytes, private: bool = False) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, data, 0o600 if private else 0o644)  # private keys readable by their owner only


def _name(common: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "stagewise federation"),
                      x509.NameAttribute(NameOID.COMMON_NAME, common)])


def _san(host: str) -> x509.GeneralName:
    try:
        return x509.IPAddress(ipaddress.ip_address(host))
    except ValueError:
        return x509.DNSName(host)


def make_certificates(folder: str | Path, hosts: list[str], days: int = 825) -> dict[str, Path]:
    """A certificate authority and a server certificate valid for `hosts` (names or IPs).

    Returns the paths of ca.pem (give it to every hospital), server.pem and server.key (they
    stay with the coordinator). Existing files are never overwritten: rotating keys is a
    decision, not a side effect."""
    folder = Path(folder)
    paths = {"ca": folder / CA_FILE, "cert": folder / SERVER_CERT, "key": folder / SERVER_KEY}
    if present := [str(p) for p in paths.values() if p.exists()]:
        raise FileExistsError(f"{', '.join(present)} already exist; choose another folder or remove them to make new keys")
    if not hosts:
        raise ValueError("name at least one host (name or IP address) the hospitals will connect to")
    now = datetime.datetime.now(datetime.timezone.utc)
    until = now + datetime.timedelta(days=days)
    ca_key = ec.generate_private_key(ec.SECP384R1())
    ca = (x509.CertificateBuilder().subject_name(_name("stagewise federation CA")).issuer_name(_name("stagewise federation CA"))
          .public_key(ca_key.public_key()).serial_number(x509.random_serial_number())
          .not_valid_before(now).not_valid_after(until)
          .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
          .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True, content_commitment=False,
                                       key_encipherment=False, data_encipherment=False, key_agreement=False,
                                       encipher_only=False, decipher_only=False), critical=True)
          .sign(ca_key, hashes.SHA384()))
    key = ec.generate_private_key(ec.SECP384R1())
    cert = (x509.CertificateBuilder().subject_name(_name(hosts[0])).issuer_name(ca.subject)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now).not_valid_after(until)
            .add_extension(x509.SubjectAlternativeName([_san(h) for h in dict.fromkeys([*hosts, *LOOPBACK])]),
                           critical=False)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage([x509.oid.ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
            .sign(ca_key, hashes.SHA384()))
    pem = serialization.Encoding.PEM
    _write(paths["ca"], ca.public_bytes(pem))
    _write(paths["cert"], cert.public_bytes(pem))
    _write(paths["key"], key.private_bytes(pem, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()),
           private=True)
    return paths


def make_site_key(folder: str | Path, site: str) -> dict[str, Path]:
    """A hospital's node key pair: `<site>.key` (stays at the hospital) and `<site>.pub`
    (sent to the coordinator, who admits it with `stagewise federation coordinate --site-key`)."""
    from stagewise.federated.job import SITE_NAME  # job imports torch: only this command needs it

    if not SITE_NAME.match(site):  # the name becomes a file name: never a path out of `folder`
        raise ValueError(f"site name {site!r}: use letters, digits, '_', '.', '-' (at most 64, starting with a "
                         "letter or digit), no '/' and no patient data")
    folder = Path(folder)
    paths = {"key": folder / f"{site}.key", "pub": folder / f"{site}.pub"}
    if present := [str(p) for p in paths.values() if p.exists()]:
        raise FileExistsError(f"{', '.join(present)} already exist; a site keeps its key (remove them to make a new one)")
    key = ec.generate_private_key(ec.SECP384R1())
    _write(paths["key"], key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH,
                                           serialization.NoEncryption()), private=True)
    _write(paths["pub"], key.public_key().public_bytes(serialization.Encoding.OpenSSH,
                                                       serialization.PublicFormat.OpenSSH) + f" {site}\n".encode())
    return paths


def key_fingerprint(pub: str | Path) -> str:
    """A site's public key as `ssh-keygen -l` names it (SHA256 of the key blob): what the
    job's list of admitted keys records, never the key file's path."""
    import base64
    import hashlib

    fields = Path(pub).read_text().split()
    if len(fields) < 2:
        raise ValueError(f"{pub}: not an OpenSSH public key (`stagewise federation key` makes <site>.pub)")
    try:
        blob = base64.b64decode(fields[1], validate=True)
    except ValueError:
        raise ValueError(f"{pub}: not an OpenSSH public key (`stagewise federation key` makes <site>.pub)") from None
    return "SHA256:" + base64.b64encode(hashlib.sha256(blob).digest()).decode().rstrip("=")


def public_key_pem(pub: str | Path) -> bytes:
    """A site's OpenSSH public key as the SuperLink's Control API takes it (PEM), as
    `flwr supernode register` sends it; a clear error for any other file."""
    try:
        key = serialization.load_ssh_public_key(Path(pub).read_bytes())
    except (ValueError, UnsupportedAlgorithm):
        key = None
    if not isinstance(key, ec.EllipticCurvePublicKey):
        raise ValueError(f"{pub}: not a site's public key (`stagewise federation key` makes <site>.pub)")
    return key.public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)


def private_key_fingerprint(key: str | Path) -> str:
    """`key_fingerprint` of the public half of a site's private key (<site>.key): the same
    line the coordinator's list of admitted sites records for its <site>.pub."""
    import base64
    import hashlib

    try:
        private = serialization.load_ssh_private_key(Path(key).read_bytes(), password=None)
    except (ValueError, TypeError) as err:
        raise ValueError(f"{key}: not this site's private key ({err}); `stagewise federation key` makes <site>.key") \
            from None
    blob = private.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH).split()[1]
    return "SHA256:" + base64.b64encode(hashlib.sha256(base64.b64decode(blob)).digest()).decode().rstrip("=")


def check_server_certificates(folder: str | Path) -> None:
    """Refuse, naming the files, a certificate folder the SuperLink could not serve from:
    a missing file, files swapped (the CA where the server certificate belongs, a key that is
    not the server certificate's), or a server certificate the CA did not sign."""
    folder = Path(folder)
    paths = {n: folder / n for n in (CA_FILE, SERVER_CERT, SERVER_KEY)}
    if missing := [str(p) for p in paths.values() if not p.is_file()]:
        raise ValueError(f"{', '.join(missing)}: not found; --certs names the folder `stagewise federation certs` "
                         f"wrote ({CA_FILE}, {SERVER_CERT}, {SERVER_KEY})")
    certs = {}
    for name in (CA_FILE, SERVER_CERT):
        try:
            certs[name] = x509.load_pem_x509_certificate(paths[name].read_bytes())
        except ValueError:
            raise ValueError(f"{paths[name]} is not a PEM certificate (a key file in its place? the files may be "
                             "swapped): make them again with `stagewise federation certs`") from None
    try:
        key = serialization.load_pem_private_key(paths[SERVER_KEY].read_bytes(), password=None)
    except (ValueError, TypeError):
        raise ValueError(f"{paths[SERVER_KEY]} is not an unencrypted PEM private key (a certificate in its place? "
                         "the files may be swapped)") from None
    ca, cert = certs[CA_FILE], certs[SERVER_CERT]
    if not _is_ca(ca) or _is_ca(cert):
        raise ValueError(f"{paths[CA_FILE]} and {paths[SERVER_CERT]} look swapped: {CA_FILE} must be the certificate "
                         f"authority, {SERVER_CERT} the server's certificate")
    if cert.issuer != ca.subject:
        raise ValueError(f"{paths[SERVER_CERT]} was not issued by {paths[CA_FILE]}: use the files one "
                         "`stagewise federation certs` made together")
    pem = serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    if key.public_key().public_bytes(*pem) != cert.public_key().public_bytes(*pem):
        raise ValueError(f"{paths[SERVER_KEY]} is not the key of {paths[SERVER_CERT]}: use the files one "
                         "`stagewise federation certs` made together")


def _is_ca(cert: x509.Certificate) -> bool:
    try:
        return bool(cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca)
    except x509.ExtensionNotFound:
        return False
