"""Capsule signatures, compatible with `cosign sign-blob --key` and key-based Sigstore bundles.

Format (what cosign does for an ECDSA P-256 key pair, checked against cosign's source):
  - the signature is ECDSA P-256 over the SHA-256 of the archive bytes, ASN.1 DER, and travels as
    standard base64 (`cosign sign-blob --key cosign.key FILE` prints exactly that);
  - public keys are PEM `PUBLIC KEY` (PKIX SubjectPublicKeyInfo), like `cosign.pub`;
  - a Sigstore bundle (v0.3, key-based) carries the same signature in
    `messageSignature.signature`, the archive's SHA-256 in `messageSignature.messageDigest`, and
    `verificationMaterial.publicKey.hint` = base64 of the SHA-256 of the DER public key (cosign's
    `internal/key/svkeypair.go` and `verify_bundle.go`).

Because the signature covers only the SHA-256, the service verifies with the digest it computed
while streaming the upload (`verify_digest`), never holding the archive in memory.

Private keys: PKCS#8 or SEC1 PEM, optionally password-encrypted (PKCS#8 PBES2, what
`soma capsule keygen` writes by default; `cosign import-key-pair --key FILE` imports an unencrypted
one into cosign), or cosign's own `cosign.key`: PEM "ENCRYPTED SIGSTORE PRIVATE KEY" (or the older
label "ENCRYPTED COSIGN PRIVATE KEY") around the JSON of go-securesystemslib's `encrypted` package,
`{"kdf": {"name": "scrypt", "params": {"N", "r", "p"}, "salt"}, "cipher": {"name":
"nacl/secretbox", "nonce"}, "ciphertext"}` (byte strings in standard base64), where the ciphertext
is NaCl secretbox (XSalsa20-Poly1305, via PyNaCl) of the PKCS#8 DER private key under the 32-byte
scrypt key of the password. Like that package, only its three scrypt parameter sets are accepted
(N = 2^15, 2^16 or 2^17 with r = 8, p = 1), so a tampered file cannot make us burn memory and time,
and like cosign the plaintext must be PKCS#8. cosign allows an empty password, so a cosign key is
first tried with the empty one when no password is given. `generate_keypair(...,
cosign_format=True)` writes that format (with cosign's current parameters, N = 2^16), which
`cosign sign-blob --key` uses as it is.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import dsa, ec, ed448, ed25519, rsa, utils
from cryptography.hazmat.primitives.kdf.scrypt import Scrypt
from nacl.exceptions import CryptoError
from nacl.secret import SecretBox

from services.common.errors import InvalidArgument

KEY_ALGORITHM = "ECDSA_P256_SHA256"

# Field names for BadRequest violations (the API fields these values arrive in).
PUBLIC_KEY_FIELD = "publisher_key.public_key_pem"
PRIVATE_KEY_FIELD = "key"
BUNDLE_FIELD = "metadata.sigstore_bundle"

MAX_PUBLIC_KEY_PEM_BYTES = 4 << 10
MAX_PRIVATE_KEY_PEM_BYTES = 16 << 10
# A key-based bundle is a few KiB even with a transparency-log entry and a timestamp.
MAX_BUNDLE_BYTES = 256 << 10
# Base64 values here (a DER signature is at most 72 bytes, a digest 32) are short: bound the work.
_MAX_B64_CHARS = 2048

BUNDLE_MEDIA_TYPE = "application/vnd.dev.sigstore.bundle.v0.3+json"
BUNDLE_MEDIA_TYPES = frozenset(
    {
        BUNDLE_MEDIA_TYPE,
        "application/vnd.dev.sigstore.bundle+json;version=0.3",
        "application/vnd.dev.sigstore.bundle+json;version=0.2",
        "application/vnd.dev.sigstore.bundle+json;version=0.1",
    }
)

# PEM labels of cosign's own encrypted private key files (pkg/cosign/keys.go); it writes the first.
COSIGN_PRIVATE_KEY_LABEL = "ENCRYPTED SIGSTORE PRIVATE KEY"
COSIGN_PRIVATE_KEY_LABELS = (COSIGN_PRIVATE_KEY_LABEL, "ENCRYPTED COSIGN PRIVATE KEY")

# go-securesystemslib `encrypted` (what cosign's keys.go calls): the scrypt parameter sets that
# Decrypt accepts (legacy, standard, OWASP; checked before any work, against tampering) and the
# one Encrypt writes (standard), its salt size, and the NaCl secretbox sizes.
_COSIGN_KDF = "scrypt"
_COSIGN_CIPHER = "nacl/secretbox"
_COSIGN_SCRYPT_PARAMS = ((32768, 8, 1), (65536, 8, 1), (131072, 8, 1))
_COSIGN_SCRYPT_WRITE = (65536, 8, 1)
_COSIGN_SALT_BYTES = 32
_COSIGN_PEM = re.compile(
    rb"-----BEGIN (ENCRYPTED (?:SIGSTORE|COSIGN) PRIVATE KEY)-----\r?\n(.*?)-----END \1-----",
    re.DOTALL,
)

_PEM_LABEL = re.compile(r"-----BEGIN ([A-Z0-9 ]+)-----")
_SHA2_256_ENUM = 1  # HashAlgorithm.SHA2_256, for protojson written with enum numbers
_CURVE_NAMES = {"secp256r1": "P-256", "secp384r1": "P-384", "secp521r1": "P-521"}
_ECDSA_SHA256 = ec.ECDSA(utils.Prehashed(hashes.SHA256()))
_MAKE_KEY = "create one with `soma capsule keygen` or `cosign generate-key-pair`"


# --- keys -------------------------------------------------------------------------------------


def generate_keypair(password: bytes | None, *, cosign_format: bool = False) -> tuple[bytes, bytes]:
    """A new P-256 key pair: (private PEM, public PEM PKIX), like cosign.key / cosign.pub.

    By default the private key is PKCS#8: encrypted (PBES2) with a non-empty password, unencrypted
    when the password is None or b"". With `cosign_format` it is cosign's own encrypted format
    (`cosign_private_key_pem`), always encrypted, with the empty password when None or b"" (as
    `cosign generate-key-pair` does when given an empty password).
    """
    private_key = ec.generate_private_key(ec.SECP256R1())
    public_pem = public_key_pem(private_key.public_key()).encode()
    if cosign_format:
        return cosign_private_key_pem(private_key, password), public_pem
    encryption: serialization.KeySerializationEncryption = (
        serialization.BestAvailableEncryption(password)
        if password
        else serialization.NoEncryption()
    )
    private_pem = private_key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, encryption
    )
    return private_pem, public_pem


def cosign_private_key_pem(
    private_key: ec.EllipticCurvePrivateKey, password: bytes | None
) -> bytes:
    """`private_key` in cosign's encrypted format, byte for byte as cosign writes it.

    The PEM block "ENCRYPTED SIGSTORE PRIVATE KEY" (64-character lines) holds the compact JSON
    that go-securesystemslib's `encrypted.Encrypt` marshals: scrypt (N = 2^16, r = 8, p = 1, a
    random 32-byte salt) derives the 32-byte key from the password (None means empty), and NaCl
    secretbox with a random 24-byte nonce seals the PKCS#8 DER private key.
    """
    n, r, p = _COSIGN_SCRYPT_WRITE
    salt = os.urandom(_COSIGN_SALT_BYTES)
    nonce = os.urandom(SecretBox.NONCE_SIZE)
    plaintext = private_key.private_bytes(
        serialization.Encoding.DER,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    sealed = SecretBox(_cosign_box_key(password or b"", salt, n, r, p)).encrypt(plaintext, nonce)
    document = {
        "kdf": {
            "name": _COSIGN_KDF,
            "params": {"N": n, "r": r, "p": p},
            "salt": base64.b64encode(salt).decode(),
        },
        "cipher": {"name": _COSIGN_CIPHER, "nonce": base64.b64encode(nonce).decode()},
        "ciphertext": base64.b64encode(sealed.ciphertext).decode(),
    }
    body = base64.b64encode(json.dumps(document, separators=(",", ":")).encode()).decode()
    lines = [body[i : i + 64] for i in range(0, len(body), 64)]
    label = COSIGN_PRIVATE_KEY_LABEL
    return "\n".join([f"-----BEGIN {label}-----", *lines, f"-----END {label}-----", ""]).encode()


def public_key_pem(public_key: ec.EllipticCurvePublicKey) -> str:
    """PEM `PUBLIC KEY` (PKIX), the form cosign writes to cosign.pub."""
    return public_key.public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    ).decode()


def load_public_key(pem: str | bytes) -> ec.EllipticCurvePublicKey:
    """Parse a publisher key; InvalidArgument unless it is one ECDSA P-256 PKIX PEM block."""
    data = pem.encode() if isinstance(pem, str) else pem
    if len(data) > MAX_PUBLIC_KEY_PEM_BYTES:
        raise _key_error(
            f"the public key PEM is {len(data)} bytes; a P-256 public key PEM is under 200 bytes "
            f"and at most {MAX_PUBLIC_KEY_PEM_BYTES} are accepted: give only the content of "
            "cosign.pub"
        )
    labels = _PEM_LABEL.findall(data.decode("utf-8", "replace"))
    if not labels:
        raise _key_error(
            "the public key is not PEM: expected the content of cosign.pub, starting with "
            "'-----BEGIN PUBLIC KEY-----'"
        )
    if len(labels) > 1:
        raise _key_error(
            f"the public key text holds {len(labels)} PEM blocks; give exactly one "
            "'PUBLIC KEY' block (the content of cosign.pub)"
        )
    label = labels[0]
    if "PRIVATE KEY" in label:
        raise _key_error(
            f"this is a private key ({label}), not a public key: register cosign.pub (or the "
            "public key printed by `soma capsule keygen`) and keep the private key secret"
        )
    if label == "CERTIFICATE":
        raise _key_error(
            "this is a certificate; keyless (certificate) signing is not supported: register "
            "the public key of a cosign key pair (cosign.pub)"
        )
    try:
        key = serialization.load_pem_public_key(data)
    except (ValueError, UnsupportedAlgorithm) as exc:
        raise _key_error(
            f"the '{label}' PEM block is not a valid public key (corrupt, truncated or "
            f"edited base64: {_first_line(exc)}); copy cosign.pub again"
        ) from None
    if not isinstance(key, ec.EllipticCurvePublicKey) or not isinstance(key.curve, ec.SECP256R1):
        raise _unsupported_key(key, PUBLIC_KEY_FIELD, "publisher key")
    return key


def load_private_key(pem: bytes, password: bytes | None) -> ec.EllipticCurvePrivateKey:
    """Parse a signing key: PKCS#8 or SEC1 PEM (encrypted PKCS#8 when `password` is given), or
    cosign's encrypted `cosign.key` (see the module doc).
    """
    if len(pem) > MAX_PRIVATE_KEY_PEM_BYTES:
        raise _private_error(
            f"the private key file is {len(pem)} bytes, more than the "
            f"{MAX_PRIVATE_KEY_PEM_BYTES} a PEM private key takes: is it the right file?"
        )
    labels = _PEM_LABEL.findall(pem.decode("utf-8", "replace"))
    if any(label in COSIGN_PRIVATE_KEY_LABELS for label in labels):
        return _load_cosign_private_key(pem, password)
    private_labels = [label for label in labels if "PRIVATE KEY" in label]
    if not private_labels:
        raise _private_error(
            "the key file holds no PEM private key: expected '-----BEGIN PRIVATE KEY-----' or "
            "'-----BEGIN ENCRYPTED PRIVATE KEY-----' (what `soma capsule keygen` writes)"
        )
    encrypted = private_labels[0] == "ENCRYPTED PRIVATE KEY" or b"Proc-Type: 4,ENCRYPTED" in pem
    if encrypted and not password:
        raise _private_error(
            "the private key is encrypted: give its password (e.g. `--password-env VAR`)",
            reason="PRIVATE_KEY_PASSWORD_REQUIRED",
        )
    try:
        key = serialization.load_pem_private_key(pem, password if encrypted else None)
    except (ValueError, TypeError, UnsupportedAlgorithm) as exc:
        if encrypted:
            raise _private_error(
                "cannot decrypt the private key: wrong password, or the file is corrupt",
                reason="PRIVATE_KEY_PASSWORD_WRONG",
            ) from None
        raise _private_error(
            f"the private key PEM could not be parsed ({_first_line(exc)}); is it the right file?"
        ) from None
    if not isinstance(key, ec.EllipticCurvePrivateKey) or not isinstance(key.curve, ec.SECP256R1):
        raise _unsupported_key(key, PRIVATE_KEY_FIELD, "signing key")
    return key


def _load_cosign_private_key(pem: bytes, password: bytes | None) -> ec.EllipticCurvePrivateKey:
    """cosign's `LoadPrivateKey`: go-securesystemslib `encrypted.Decrypt`, then PKCS#8."""
    match = _COSIGN_PEM.search(pem)
    if match is None:
        raise _private_error(
            "the cosign private key PEM block is incomplete (no matching '-----END ...-----' "
            "line): copy the whole cosign.key file"
        )
    label = match.group(1).decode()
    body = _decode_b64(match.group(2).decode("ascii", "replace"), MAX_PRIVATE_KEY_PEM_BYTES)
    try:
        document = json.loads(body) if body else None
    except (ValueError, RecursionError):
        document = None
    if not isinstance(document, dict):
        raise _cosign_key_error(f"the '{label}' PEM block does not hold the JSON cosign writes")
    kdf = _cosign_object(document, "kdf")
    cipher = _cosign_object(document, "cipher")
    if kdf.get("name") != _COSIGN_KDF:
        raise _cosign_key_error(f"kdf.name is {kdf.get('name')!r}, expected {_COSIGN_KDF!r}")
    if cipher.get("name") != _COSIGN_CIPHER:
        raise _cosign_key_error(
            f"cipher.name is {cipher.get('name')!r}, expected {_COSIGN_CIPHER!r}"
        )
    params = kdf.get("params")
    values = tuple(params.get(name) for name in ("N", "r", "p")) if isinstance(params, dict) else ()
    # Integers only, as Go's int fields: 32768.0 or true (== 1 in Python) are refused too.
    if not all(type(value) is int for value in values) or values not in _COSIGN_SCRYPT_PARAMS:
        raise _cosign_key_error(
            f"unsupported scrypt parameters {params!r}: cosign accepts N = 32768, 65536 or "
            "131072 with r = 8 and p = 1"
        )
    n, r, p = values
    salt = _cosign_bytes(kdf, "salt", "kdf.")
    nonce = _cosign_bytes(cipher, "nonce", "cipher.")
    ciphertext = _cosign_bytes(document, "ciphertext")
    if len(nonce) != SecretBox.NONCE_SIZE:
        raise _cosign_key_error(
            f"cipher.nonce is {len(nonce)} bytes, a secretbox nonce is {SecretBox.NONCE_SIZE}"
        )
    if len(ciphertext) <= SecretBox.MACBYTES:
        raise _cosign_key_error("the ciphertext is too short to hold a key")

    try:
        plaintext = SecretBox(_cosign_box_key(password or b"", salt, n, r, p)).decrypt(
            ciphertext, nonce
        )
    except CryptoError:
        if not password:
            raise _private_error(
                "the cosign private key is encrypted: give the password it was created with "
                "(e.g. `--password-env VAR`)",
                reason="PRIVATE_KEY_PASSWORD_REQUIRED",
            ) from None
        raise _private_error(
            "cannot decrypt the cosign private key: wrong password, or the file is corrupt",
            reason="PRIVATE_KEY_PASSWORD_WRONG",
        ) from None
    # cosign parses the plaintext with x509.ParsePKCS8PrivateKey: PKCS#8 only, as the PEM label
    # "PRIVATE KEY" makes `cryptography` require too.
    pkcs8_pem = b"\n".join(
        [b"-----BEGIN PRIVATE KEY-----", base64.b64encode(plaintext), b"-----END PRIVATE KEY-----"]
    )
    try:
        key = serialization.load_pem_private_key(pkcs8_pem, None)
    except (ValueError, TypeError, UnsupportedAlgorithm) as exc:
        raise _private_error(
            f"the cosign private key decrypts, but not to a PKCS#8 private key as cosign writes "
            f"({_first_line(exc)})"
        ) from None
    if not isinstance(key, ec.EllipticCurvePrivateKey) or not isinstance(key.curve, ec.SECP256R1):
        raise _unsupported_key(key, PRIVATE_KEY_FIELD, "signing key")
    return key


def _cosign_box_key(password: bytes, salt: bytes, n: int, r: int, p: int) -> bytes:
    """The secretbox key: scrypt(password, salt, N, r, p), 32 bytes (`scryptKDF.Key`)."""
    return Scrypt(salt=salt, length=SecretBox.KEY_SIZE, n=n, r=r, p=p).derive(password)


def _cosign_object(document: Mapping[str, Any], name: str) -> dict[str, Any]:
    value = document.get(name)
    if not isinstance(value, dict):
        raise _cosign_key_error(f"'{name}' is missing or not a JSON object")
    return value


def _cosign_bytes(obj: Mapping[str, Any], name: str, where: str = "") -> bytes:
    """A []byte field of the JSON: standard base64 (Go's encoding/json)."""
    value = obj.get(name)
    decoded = _decode_b64(value, MAX_PRIVATE_KEY_PEM_BYTES)
    if not decoded and value != "":
        raise _cosign_key_error(f"'{where}{name}' is missing or not standard base64")
    return decoded


def fingerprint(key: ec.EllipticCurvePublicKey) -> str:
    """`sha256:<hex>` of the DER SubjectPublicKeyInfo (PublisherKey.fingerprint)."""
    return "sha256:" + hashlib.sha256(_spki_der(key)).hexdigest()


def key_hint(key: ec.EllipticCurvePublicKey) -> str:
    """What cosign writes to a bundle's `publicKey.hint`: base64 of SHA-256 of the DER SPKI."""
    return base64.b64encode(hashlib.sha256(_spki_der(key)).digest()).decode()


# --- signatures -------------------------------------------------------------------------------


def file_sha256(path: Path) -> bytes:
    """SHA-256 of a file, streamed (bounded memory whatever its size)."""
    with path.open("rb") as handle:
        return hashlib.file_digest(handle, "sha256").digest()


def sign_digest(private_key: ec.EllipticCurvePrivateKey, digest: bytes) -> str:
    """Base64 DER ECDSA signature over a SHA-256 digest: what `cosign sign-blob --key` prints."""
    if len(digest) != hashlib.sha256().digest_size:
        raise ValueError(f"expected a 32-byte SHA-256 digest, got {len(digest)} bytes")
    return base64.b64encode(private_key.sign(digest, _ECDSA_SHA256)).decode()


def sign_file(path: Path, private_key: ec.EllipticCurvePrivateKey) -> str:
    """Sign a file like `cosign sign-blob --key`, reading it in chunks."""
    return sign_digest(private_key, file_sha256(path))


def verify_digest(public_key: ec.EllipticCurvePublicKey, digest: bytes, signature_b64: str) -> bool:
    """True if `signature_b64` is a valid signature of the SHA-256 `digest` by `public_key`.

    Never raises on bad input: malformed base64, a non-DER signature or a wrong-size digest are
    all just "does not verify".
    """
    signature = _decode_b64(signature_b64)
    if not signature or len(digest) != hashlib.sha256().digest_size:
        return False
    try:
        public_key.verify(signature, digest, _ECDSA_SHA256)
    except (InvalidSignature, ValueError, TypeError):
        return False
    return True


def read_signature(data: bytes) -> str:
    """A signature file's content as base64, accepting what `cosign verify-blob --signature` does.

    cosign writes base64 text; a file with the raw DER bytes is accepted too (cosign re-encodes
    one that is not valid base64). Surrounding whitespace and line breaks are ignored.
    """
    text = data.decode("ascii", "replace")
    decoded = _decode_b64(text)
    if decoded:
        return base64.b64encode(decoded).decode()
    return base64.b64encode(data).decode()


# --- Sigstore bundles -------------------------------------------------------------------------


@dataclass(frozen=True)
class BundleSignature:
    """The parts of a key-based Sigstore bundle that capsule verification uses."""

    signature_b64: str  # canonical base64 of the DER signature
    digest: bytes | None  # messageDigest (SHA-256) when the bundle has one; identifies the file
    key_hint: str  # verificationMaterial.publicKey.hint ("" when absent)


def parse_bundle(text: str) -> BundleSignature:
    """Parse a key-based Sigstore bundle (v0.3; v0.1/v0.2 media types too).

    Only what a key-based message signature needs is read; transparency-log entries and
    timestamps are ignored (the registry verifies offline against the tenant's keys).
    """
    if len(text.encode()) > MAX_BUNDLE_BYTES:
        raise _bundle_error(
            f"the Sigstore bundle is larger than {MAX_BUNDLE_BYTES} bytes; a key-based bundle "
            "is a few KiB: is it the right file?"
        )
    try:
        bundle = json.loads(text)
    except RecursionError:
        raise _bundle_error("the Sigstore bundle is not valid JSON (nested too deeply)") from None
    except ValueError as exc:
        raise _bundle_error(f"the Sigstore bundle is not valid JSON ({exc})") from None
    if not isinstance(bundle, dict):
        raise _bundle_error("the Sigstore bundle must be a JSON object")

    media_type = _field(bundle, "mediaType")
    if media_type not in BUNDLE_MEDIA_TYPES:
        raise _bundle_error(
            f"unsupported Sigstore bundle mediaType {media_type!r}: expected "
            f"{BUNDLE_MEDIA_TYPE!r} (written by `cosign sign-blob --key ... --bundle FILE`)",
            reason="SIGSTORE_BUNDLE_UNSUPPORTED",
        )
    if _field(bundle, "dsseEnvelope") is not None:
        raise _bundle_error(
            "this bundle holds a DSSE envelope (an attestation, e.g. from `cosign attest-blob`), "
            "not a signature of the archive: use a key-based message signature bundle, "
            "`cosign sign-blob --key cosign.key --bundle FILE.sigstore.json FILE`",
            reason="SIGSTORE_BUNDLE_UNSUPPORTED",
        )
    material = _object(bundle, "verificationMaterial")
    if material is None:
        raise _bundle_error("the bundle has no verificationMaterial (with the publicKey hint)")
    hint = _bundle_key_hint(material)

    message = _object(bundle, "messageSignature")
    if message is None:
        raise _bundle_error(
            "the bundle has no messageSignature: expected a key-based message signature bundle, "
            "`cosign sign-blob --key cosign.key --bundle FILE.sigstore.json FILE`"
        )
    signature_text = _field(message, "signature")
    if not isinstance(signature_text, str) or not signature_text:
        raise _bundle_error("the bundle's messageSignature.signature is missing")
    signature = _decode_b64(signature_text)
    if not signature:
        raise _bundle_error("the bundle's messageSignature.signature is not valid base64")
    return BundleSignature(
        signature_b64=base64.b64encode(signature).decode(),
        digest=_bundle_digest(message),
        key_hint=hint,
    )


def make_bundle(signature_b64: str, digest: bytes, key_hint: str) -> str:
    """A minimal key-based Sigstore bundle v0.3 (no log entry), as `soma capsule sign --bundle`.

    The same shape as the bundle cosign's own verify-blob tests accept with `--key cosign.pub
    --insecure-ignore-tlog=true` (cmd/cosign/cli/verify/verify_blob_test.go, makeLocalNewBundle).
    """
    if len(digest) != hashlib.sha256().digest_size:
        raise ValueError(f"expected a 32-byte SHA-256 digest, got {len(digest)} bytes")
    bundle = {
        "mediaType": BUNDLE_MEDIA_TYPE,
        "verificationMaterial": {"publicKey": {"hint": key_hint}},
        "messageSignature": {
            "messageDigest": {
                "algorithm": "SHA2_256",
                "digest": base64.b64encode(digest).decode(),
            },
            "signature": signature_b64,
        },
    }
    return json.dumps(bundle, indent=2) + "\n"


def check_bundle_digest(bundle: BundleSignature, digest: bytes) -> None:
    """InvalidArgument when the bundle names another file than the one with `digest`."""
    if bundle.digest is not None and bundle.digest != digest:
        raise _bundle_error(
            f"the Sigstore bundle was made for another file: its messageDigest is "
            f"sha256:{bundle.digest.hex()}, the archive is sha256:{digest.hex()}",
            reason="SIGSTORE_BUNDLE_DIGEST_MISMATCH",
        )


def _bundle_key_hint(material: Mapping[str, Any]) -> str:
    public_key = _field(material, "publicKey")
    if public_key is None:
        if any(
            _field(material, name) is not None for name in ("certificate", "x509CertificateChain")
        ):
            raise _bundle_error(
                "this bundle is certificate-based (keyless signing); capsules need a key-based "
                "bundle: `cosign sign-blob --key cosign.key --bundle FILE.sigstore.json FILE`",
                reason="SIGSTORE_BUNDLE_UNSUPPORTED",
            )
        raise _bundle_error("the bundle's verificationMaterial.publicKey is missing")
    if not isinstance(public_key, dict):
        raise _bundle_error("the bundle's verificationMaterial.publicKey must be an object")
    hint = public_key.get("hint", "")
    if not isinstance(hint, str):
        raise _bundle_error("the bundle's verificationMaterial.publicKey.hint must be a string")
    return hint


def _bundle_digest(message: Mapping[str, Any]) -> bytes | None:
    # The spec makes messageDigest optional; cosign always writes it.
    digest = _object(message, "messageDigest", "messageSignature.")
    if digest is None:
        return None
    algorithm = digest.get("algorithm")
    if algorithm not in ("SHA2_256", _SHA2_256_ENUM):
        raise _bundle_error(
            f"the bundle's messageSignature.messageDigest.algorithm is {algorithm!r}; capsule "
            "signatures are "
            "ECDSA P-256 over SHA-256, so it must be 'SHA2_256'",
            reason="SIGSTORE_BUNDLE_UNSUPPORTED",
        )
    value = _decode_b64(digest.get("digest") or "")
    if len(value) != hashlib.sha256().digest_size:
        raise _bundle_error(
            "the bundle's messageSignature.messageDigest.digest must be the base64 of a "
            "32-byte SHA-256"
        )
    return value


# --- helpers ----------------------------------------------------------------------------------


def _field(obj: Mapping[str, Any], camel: str) -> Any:
    """A bundle field by its JSON name or its proto name (protojson accepts both)."""
    if camel in obj:
        return obj[camel]
    return obj.get(re.sub(r"(?<!^)([A-Z])", r"_\1", camel).lower())


def _object(obj: Mapping[str, Any], name: str, where: str = "") -> dict[str, Any] | None:
    """An optional JSON-object field of the bundle."""
    value = _field(obj, name)
    if value is not None and not isinstance(value, dict):
        raise _bundle_error(f"the bundle's {where}{name} must be a JSON object")
    return value


def _decode_b64(text: object, max_chars: int = _MAX_B64_CHARS) -> bytes:
    """Strict standard base64 (line breaks ignored, like Go's decoder); b"" when invalid."""
    if not isinstance(text, str) or len(text) > max_chars:
        return b""
    try:
        return base64.b64decode("".join(text.split()), validate=True)
    except (binascii.Error, ValueError):
        return b""


def _spki_der(key: ec.EllipticCurvePublicKey) -> bytes:
    return key.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def _describe(key: object) -> str:
    if isinstance(key, ec.EllipticCurvePublicKey | ec.EllipticCurvePrivateKey):
        return "ECDSA " + _CURVE_NAMES.get(key.curve.name, key.curve.name)
    if isinstance(key, rsa.RSAPublicKey | rsa.RSAPrivateKey):
        return f"RSA-{key.key_size}"
    if isinstance(key, ed25519.Ed25519PublicKey | ed25519.Ed25519PrivateKey):
        return "Ed25519"
    if isinstance(key, ed448.Ed448PublicKey | ed448.Ed448PrivateKey):
        return "Ed448"
    if isinstance(key, dsa.DSAPublicKey | dsa.DSAPrivateKey):
        return "DSA"
    return type(key).__name__


def _unsupported_key(key: object, field: str, what: str) -> InvalidArgument:
    return InvalidArgument(
        f"the {what} is {_describe(key)}; capsule signatures use ECDSA P-256 with SHA-256 "
        f"(cosign's default key type): {_MAKE_KEY}",
        field=field,
        reason="KEY_ALGORITHM_UNSUPPORTED",
    )


def _first_line(exc: Exception) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__


def _key_error(message: str) -> InvalidArgument:
    return InvalidArgument(message, field=PUBLIC_KEY_FIELD, reason="PUBLIC_KEY_INVALID")


def _private_error(message: str, *, reason: str = "PRIVATE_KEY_INVALID") -> InvalidArgument:
    return InvalidArgument(message, field=PRIVATE_KEY_FIELD, reason=reason)


def _cosign_key_error(detail: str) -> InvalidArgument:
    return _private_error(
        f"the cosign private key is malformed ({detail}); copy the whole cosign.key file again"
    )


def _bundle_error(message: str, *, reason: str = "SIGSTORE_BUNDLE_INVALID") -> InvalidArgument:
    return InvalidArgument(message, field=BUNDLE_FIELD, reason=reason)
