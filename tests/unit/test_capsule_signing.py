"""Capsule signing: cosign-compatible ECDSA P-256 signatures, keys and Sigstore bundles.

The interop tests use real vectors copied from public Sigstore repositories (see
tests/unit/data/cosign/README.md): signatures that cosign's own test suite and the Sigstore
conformance suite accept.
"""

from __future__ import annotations

import base64
import datetime
import hashlib
import json
import re
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from cryptography.x509.oid import NameOID

from services.capsule import signing
from services.common.errors import InvalidArgument

DATA = Path(__file__).parent / "data" / "cosign"


def _read(name: str) -> bytes:
    return (DATA / name).read_bytes()


def _pub_pem(key: object) -> str:
    return key.public_bytes(  # type: ignore[attr-defined]
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    ).decode()


def _private_pem(key: object) -> bytes:
    return key.private_bytes(  # type: ignore[attr-defined]
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


@pytest.fixture(scope="module")
def keypair() -> tuple[ec.EllipticCurvePrivateKey, ec.EllipticCurvePublicKey]:
    private_pem, public_pem = signing.generate_keypair(None)
    return (
        signing.load_private_key(private_pem, None),
        signing.load_public_key(public_pem.decode()),
    )


@pytest.fixture
def archive(tmp_path: Path) -> Path:
    path = tmp_path / "hello-1.0.0.tar.gz"
    path.write_bytes(b"capsule archive bytes " * 1000)
    return path


# --- round trips ------------------------------------------------------------------------------


def test_sign_file_round_trip(keypair, archive: Path) -> None:
    private_key, public_key = keypair
    signature = signing.sign_file(archive, private_key)
    assert signing.verify_digest(public_key, signing.file_sha256(archive), signature)
    # cosign semantics: a plain ECDSA-with-SHA-256 signature of the archive bytes (DER).
    public_key.verify(base64.b64decode(signature), archive.read_bytes(), ec.ECDSA(hashes.SHA256()))


def test_generated_keys_have_cosign_formats() -> None:
    private_pem, public_pem = signing.generate_keypair(None)
    assert private_pem.startswith(b"-----BEGIN PRIVATE KEY-----")
    assert public_pem.startswith(b"-----BEGIN PUBLIC KEY-----")
    key = serialization.load_pem_public_key(public_pem)
    assert isinstance(key, ec.EllipticCurvePublicKey) and key.curve.name == "secp256r1"
    assert signing.KEY_ALGORITHM == "ECDSA_P256_SHA256"


def test_encrypted_private_key_needs_the_right_password(archive: Path) -> None:
    private_pem, public_pem = signing.generate_keypair(b"correct horse")
    assert private_pem.startswith(b"-----BEGIN ENCRYPTED PRIVATE KEY-----")
    with pytest.raises(InvalidArgument) as missing:
        signing.load_private_key(private_pem, None)
    assert missing.value.reason == "PRIVATE_KEY_PASSWORD_REQUIRED"
    with pytest.raises(InvalidArgument) as wrong:
        signing.load_private_key(private_pem, b"wrong")
    assert wrong.value.reason == "PRIVATE_KEY_PASSWORD_WRONG"
    assert "wrong password" in wrong.value.message

    private_key = signing.load_private_key(private_pem, b"correct horse")
    public_key = signing.load_public_key(public_pem.decode())
    signature = signing.sign_file(archive, private_key)
    assert signing.verify_digest(public_key, signing.file_sha256(archive), signature)


def test_sec1_private_key_loads() -> None:
    key = ec.generate_private_key(ec.SECP256R1())
    sec1 = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.TraditionalOpenSSL,
        serialization.NoEncryption(),
    )
    assert sec1.startswith(b"-----BEGIN EC PRIVATE KEY-----")
    loaded = signing.load_private_key(sec1, None)
    assert signing.fingerprint(loaded.public_key()) == signing.fingerprint(key.public_key())


def test_file_sha256_streams_large_files(tmp_path: Path) -> None:
    path = tmp_path / "big.bin"
    data = bytes(range(256)) * 12_000  # ~3 MiB: several read chunks
    path.write_bytes(data)
    assert signing.file_sha256(path) == hashlib.sha256(data).digest()


def test_sign_digest_refuses_a_non_sha256_digest(keypair) -> None:
    with pytest.raises(ValueError, match="32-byte"):
        signing.sign_digest(keypair[0], b"short")


# --- verification failures --------------------------------------------------------------------


def test_wrong_key_does_not_verify(keypair, archive: Path) -> None:
    signature = signing.sign_file(archive, keypair[0])
    other = signing.load_public_key(signing.generate_keypair(None)[1].decode())
    assert not signing.verify_digest(other, signing.file_sha256(archive), signature)


def test_tampered_archive_does_not_verify(keypair, archive: Path) -> None:
    signature = signing.sign_file(archive, keypair[0])
    data = bytearray(archive.read_bytes())
    data[len(data) // 2] ^= 0x01
    archive.write_bytes(bytes(data))
    assert not signing.verify_digest(keypair[1], signing.file_sha256(archive), signature)


@pytest.mark.parametrize(
    "signature",
    [
        "",
        "   ",
        "not base64 at all!",
        "MEUCIQ",  # truncated, bad padding
        base64.b64encode(b"\x30\x06\x02\x01\x00\x02\x01\x00").decode(),  # r = s = 0
        base64.b64encode(b"garbage that is not DER").decode(),
        base64.b64encode(b"\x30" * 5000).decode(),  # far too long
        "A" * 100_000,
    ],
)
def test_malformed_signature_is_false_not_an_exception(keypair, signature: str) -> None:
    assert signing.verify_digest(keypair[1], hashlib.sha256(b"x").digest(), signature) is False


def test_truncated_der_signature_is_false(keypair) -> None:
    digest = hashlib.sha256(b"x").digest()
    der = base64.b64decode(signing.sign_digest(keypair[0], digest))
    assert not signing.verify_digest(keypair[1], digest, base64.b64encode(der[:-3]).decode())


def test_wrong_size_digest_is_false(keypair) -> None:
    digest = hashlib.sha256(b"x").digest()
    signature = signing.sign_digest(keypair[0], digest)
    assert signing.verify_digest(keypair[1], digest, signature)
    assert not signing.verify_digest(keypair[1], digest[:16], signature)


def test_signature_with_line_breaks_verifies_like_cosign(keypair) -> None:
    digest = hashlib.sha256(b"x").digest()
    signature = signing.sign_digest(keypair[0], digest)
    wrapped = signature[:20] + "\n" + signature[20:] + "\n"
    assert signing.verify_digest(keypair[1], digest, wrapped)


def test_read_signature_accepts_base64_text_and_raw_der(keypair) -> None:
    signature = signing.sign_digest(keypair[0], hashlib.sha256(b"x").digest())
    assert signing.read_signature(signature.encode() + b"\n") == signature
    assert signing.read_signature(base64.b64decode(signature)) == signature


# --- public key checks ------------------------------------------------------------------------


def _self_signed_certificate_pem() -> str:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "capsule test")])
    now = datetime.datetime.now(datetime.UTC)
    certificate = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(1)
        .not_valid_before(now)
        .not_valid_after(now + datetime.timedelta(days=1))
        .sign(key, hashes.SHA256())
    )
    return certificate.public_bytes(serialization.Encoding.PEM).decode()


@pytest.mark.parametrize(
    ("make_pem", "reason", "expected"),
    [
        (
            lambda: _pub_pem(ec.generate_private_key(ec.SECP384R1()).public_key()),
            "KEY_ALGORITHM_UNSUPPORTED",
            "ECDSA P-384",
        ),
        (
            lambda: _pub_pem(rsa.generate_private_key(65537, 2048).public_key()),
            "KEY_ALGORITHM_UNSUPPORTED",
            "RSA-2048",
        ),
        (
            lambda: _pub_pem(ed25519.Ed25519PrivateKey.generate().public_key()),
            "KEY_ALGORITHM_UNSUPPORTED",
            "Ed25519",
        ),
        (lambda: "hello, I am a key", "PUBLIC_KEY_INVALID", "not PEM"),
        (
            lambda: _private_pem(ec.generate_private_key(ec.SECP256R1())).decode(),
            "PUBLIC_KEY_INVALID",
            "private key",
        ),
        (lambda: _self_signed_certificate_pem(), "PUBLIC_KEY_INVALID", "certificate"),
        (
            lambda: signing.generate_keypair(None)[1].decode() * 2,
            "PUBLIC_KEY_INVALID",
            "2 PEM blocks",
        ),
        (
            # sigstore-conformance's "wrong key": a P-256 PEM whose point was edited
            lambda: _read("conformance-wrong-key.pub").decode(),
            "PUBLIC_KEY_INVALID",
            "not a valid public key",
        ),
        (
            lambda: "-----BEGIN PUBLIC KEY-----\n" + "A" * 5000 + "\n-----END PUBLIC KEY-----\n",
            "PUBLIC_KEY_INVALID",
            "bytes",
        ),
    ],
    ids=[
        "p384",
        "rsa",
        "ed25519",
        "garbage",
        "private-key",
        "certificate",
        "two-blocks",
        "corrupt",
        "too-large",
    ],
)
def test_load_public_key_refuses_everything_but_p256(make_pem, reason: str, expected: str) -> None:
    with pytest.raises(InvalidArgument) as raised:
        signing.load_public_key(make_pem())
    error = raised.value
    assert error.reason == reason
    assert error.violations[0][0] == "publisher_key.public_key_pem"
    assert expected in error.message
    if reason == "KEY_ALGORITHM_UNSUPPORTED":
        assert "P-256" in error.message and "keygen" in error.message


def test_load_private_key_refuses_other_algorithms() -> None:
    pem = _private_pem(ec.generate_private_key(ec.SECP384R1()))
    with pytest.raises(InvalidArgument) as raised:
        signing.load_private_key(pem, None)
    assert raised.value.reason == "KEY_ALGORITHM_UNSUPPORTED"
    assert "ECDSA P-384" in raised.value.message


@pytest.mark.parametrize("text", [b"", b"garbage", signing.generate_keypair(None)[1]])
def test_load_private_key_refuses_non_private_keys(text: bytes) -> None:
    with pytest.raises(InvalidArgument) as raised:
        signing.load_private_key(text, None)
    assert raised.value.reason == "PRIVATE_KEY_INVALID"
    assert "PRIVATE KEY" in raised.value.message


# --- cosign's encrypted private key format ---------------------------------------------------

# Real cosign keys (see data/cosign/README.md) and their passwords.
COSIGN_KEYS = [
    ("sigstore-encrypted.key", b"hello"),  # cosign keys_test.go, scrypt N = 2^15
    ("cosign-encrypted-legacy-label.key", b"hello"),  # ditto, the old "COSIGN" PEM label
    ("sigstore-rs-empty-password.key", b""),  # `cosign generate-key-pair`, N = 2^16
]


def _cosign_document(pem: bytes) -> dict:
    body = b"".join(line for line in pem.splitlines() if line and not line.startswith(b"-----"))
    return json.loads(base64.b64decode(body))


def _cosign_pem(document: object, label: str = "ENCRYPTED SIGSTORE PRIVATE KEY") -> bytes:
    raw = document if isinstance(document, bytes) else json.dumps(document).encode()
    body = base64.encodebytes(raw).decode()
    return f"-----BEGIN {label}-----\n{body}-----END {label}-----\n".encode()


def _independent_decrypt(pem: bytes, password: bytes) -> bytes:
    """go-securesystemslib `encrypted.Decrypt` written out again (hashlib + PyNaCl directly)."""
    from nacl.secret import SecretBox

    doc = _cosign_document(pem)
    params = doc["kdf"]["params"]
    key = hashlib.scrypt(
        password,
        salt=base64.b64decode(doc["kdf"]["salt"]),
        n=params["N"],
        r=params["r"],
        p=params["p"],
        maxmem=256 * params["r"] * params["N"],
        dklen=32,
    )
    return SecretBox(key).decrypt(
        base64.b64decode(doc["ciphertext"]), base64.b64decode(doc["cipher"]["nonce"])
    )


@pytest.mark.parametrize(("name", "password"), COSIGN_KEYS)
def test_real_cosign_keys_load_and_sign(name: str, password: bytes, archive: Path) -> None:
    private_key = signing.load_private_key(_read(name), password)
    # cosign publishes no cosign.pub for these keys, but x509.MarshalPKCS8PrivateKey stores the
    # public point inside the encrypted PKCS#8 (ECPrivateKey.publicKey, the trailing BIT STRING):
    # the loaded key's public key must be the one cosign wrote there.
    der = _independent_decrypt(_read(name), password)
    point = private_key.public_key().public_bytes(
        serialization.Encoding.X962, serialization.PublicFormat.UncompressedPoint
    )
    assert der.endswith(b"\x03\x42\x00" + point)
    public_key = signing.load_public_key(signing.public_key_pem(private_key.public_key()))
    signature = signing.sign_file(archive, private_key)
    assert signing.verify_digest(public_key, signing.file_sha256(archive), signature)


def test_real_cosign_key_public_key_is_pinned() -> None:
    # The public key of cosign's `pemsigstorekey` (derived once; a regression pin).
    key = signing.load_private_key(_read("sigstore-encrypted.key"), b"hello")
    assert signing.public_key_pem(key.public_key()) == (
        "-----BEGIN PUBLIC KEY-----\n"
        "MFkwEwYHKoZIzj0CAQYIKoZIzj0DAQcDQgAE7z9gA/tqa9iHt/f9F3ulyVi4lwqU\n"
        "LfHWfhG2mK4eyJ8LDcLstb+VVhxj3pkMjc3fNo+sSfiIY2NLR7c+DG1V4w==\n"
        "-----END PUBLIC KEY-----\n"
    )


@pytest.mark.parametrize("password", [None, b""])
def test_cosign_key_without_password_is_required(password: bytes | None) -> None:
    with pytest.raises(InvalidArgument) as raised:
        signing.load_private_key(_read("sigstore-encrypted.key"), password)
    assert raised.value.reason == "PRIVATE_KEY_PASSWORD_REQUIRED"
    assert raised.value.violations[0][0] == signing.PRIVATE_KEY_FIELD
    assert "password" in raised.value.message


@pytest.mark.parametrize(("name", "password"), COSIGN_KEYS)
def test_cosign_key_with_wrong_password(name: str, password: bytes) -> None:
    with pytest.raises(InvalidArgument) as raised:
        signing.load_private_key(_read(name), password + b"x")
    assert raised.value.reason == "PRIVATE_KEY_PASSWORD_WRONG"
    assert "wrong password" in raised.value.message


def test_cosign_key_with_empty_password_loads_without_one() -> None:
    # cosign accepts an empty password (COSIGN_PASSWORD=""); no password means that one.
    for password in (None, b""):
        signing.load_private_key(_read("sigstore-rs-empty-password.key"), password)


def test_cosign_key_holding_sec1_is_refused_like_cosign() -> None:
    # cosign's "COSIGN PEM EC Type" case: it decrypts, but to SEC1, which cosign refuses.
    with pytest.raises(InvalidArgument) as raised:
        signing.load_private_key(_read("cosign-encrypted-ec-sec1.key"), b"hello")
    assert raised.value.reason == "PRIVATE_KEY_INVALID"
    assert "PKCS#8" in raised.value.message


def test_cosign_key_of_another_curve_is_refused() -> None:
    pem = signing.cosign_private_key_pem(ec.generate_private_key(ec.SECP384R1()), b"pw")
    with pytest.raises(InvalidArgument) as raised:
        signing.load_private_key(pem, b"pw")
    assert raised.value.reason == "KEY_ALGORITHM_UNSUPPORTED"
    assert "ECDSA P-384" in raised.value.message


def _edit(path: str, value: object) -> dict:
    """The real cosign key's JSON with one field set (or deleted, for `...`)."""
    document = _cosign_document(_read("sigstore-encrypted.key"))
    *parents, last = path.split(".")
    target = document
    for name in parents:
        target = target[name]
    if value is ...:
        del target[last]
    else:
        target[last] = value
    return document


@pytest.mark.parametrize(
    ("pem", "expected"),
    [
        (b"-----BEGIN ENCRYPTED SIGSTORE PRIVATE KEY-----\nabc\n", "incomplete"),
        (_cosign_pem(b"not json"), "JSON"),
        (_cosign_pem(b"[1, 2]"), "JSON"),
        (
            b"-----BEGIN ENCRYPTED SIGSTORE PRIVATE KEY-----\n!!!\n"
            b"-----END ENCRYPTED SIGSTORE PRIVATE KEY-----\n",
            "JSON",
        ),
        (_cosign_pem(_edit("kdf", ...)), "'kdf'"),
        (_cosign_pem(_edit("cipher", "nacl")), "'cipher'"),
        (_cosign_pem(_edit("kdf.name", "pbkdf2")), "kdf.name"),
        (_cosign_pem(_edit("cipher.name", "aes-gcm")), "cipher.name"),
        # Only go-securesystemslib's three parameter sets: no memory or time bomb.
        (_cosign_pem(_edit("kdf.params.N", 1 << 30)), "scrypt parameters"),
        (_cosign_pem(_edit("kdf.params.N", 1024)), "scrypt parameters"),
        (_cosign_pem(_edit("kdf.params.N", 32768.0)), "scrypt parameters"),
        (_cosign_pem(_edit("kdf.params.p", True)), "scrypt parameters"),
        (_cosign_pem(_edit("kdf.params", ...)), "scrypt parameters"),
        (_cosign_pem(_edit("kdf.salt", "not base64!")), "kdf.salt"),
        (_cosign_pem(_edit("cipher.nonce", ...)), "cipher.nonce"),
        (_cosign_pem(_edit("cipher.nonce", "AAAA")), "nonce is 3 bytes"),
        (_cosign_pem(_edit("ciphertext", 5)), "ciphertext"),
        (_cosign_pem(_edit("ciphertext", "AAAA")), "too short"),
    ],
)
def test_malformed_cosign_key_is_invalid_before_any_scrypt(
    pem: bytes, expected: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    def no_scrypt(*args: object) -> bytes:
        raise AssertionError("scrypt ran on a malformed key")

    monkeypatch.setattr(signing, "_cosign_box_key", no_scrypt)
    with pytest.raises(InvalidArgument) as raised:
        signing.load_private_key(pem, b"hello")
    assert raised.value.reason == "PRIVATE_KEY_INVALID"
    assert expected in raised.value.message


def test_corrupt_cosign_ciphertext_is_a_decryption_failure() -> None:
    document = _cosign_document(_read("sigstore-encrypted.key"))
    ciphertext = bytearray(base64.b64decode(document["ciphertext"]))
    ciphertext[-1] ^= 1
    document["ciphertext"] = base64.b64encode(bytes(ciphertext)).decode()
    with pytest.raises(InvalidArgument) as raised:
        signing.load_private_key(_cosign_pem(document), b"hello")
    assert raised.value.reason == "PRIVATE_KEY_PASSWORD_WRONG"
    assert "corrupt" in raised.value.message


@pytest.mark.parametrize("password", [b"correct horse", None])
def test_cosign_format_keygen_round_trip(password: bytes | None, archive: Path) -> None:
    private_pem, public_pem = signing.generate_keypair(password, cosign_format=True)
    assert private_pem.startswith(b"-----BEGIN ENCRYPTED SIGSTORE PRIVATE KEY-----\n")
    assert private_pem.endswith(b"\n-----END ENCRYPTED SIGSTORE PRIVATE KEY-----\n")
    assert all(len(line) <= 64 for line in private_pem.splitlines()[1:-1])
    private_key = signing.load_private_key(private_pem, password)
    assert signing.public_key_pem(private_key.public_key()).encode() == public_pem
    public_key = signing.load_public_key(public_pem.decode())
    signature = signing.sign_file(archive, private_key)
    assert signing.verify_digest(public_key, signing.file_sha256(archive), signature)
    # Decrypted independently of signing.py: PKCS#8 DER, as cosign's LoadPrivateKey requires.
    der = _independent_decrypt(private_pem, password or b"")
    assert serialization.load_der_private_key(der, None).private_numbers() == (
        private_key.private_numbers()
    )
    assert der == private_key.private_bytes(
        serialization.Encoding.DER, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    if password:
        for given, reason in ((None, "REQUIRED"), (b"wrong", "WRONG")):
            with pytest.raises(InvalidArgument) as raised:
                signing.load_private_key(private_pem, given)
            assert raised.value.reason == f"PRIVATE_KEY_PASSWORD_{reason}"


def test_cosign_format_is_what_cosign_writes() -> None:
    # A key `cosign generate-key-pair` wrote (current parameters: scrypt N = 2^16, r = 8, p = 1).
    real_pem = _read("sigstore-rs-empty-password.key")
    real = _cosign_document(real_pem)
    ours_pem = signing.cosign_private_key_pem(ec.generate_private_key(ec.SECP256R1()), None)
    ours = _cosign_document(ours_pem)
    # Go's encoding/json: compact, struct field order; re-serializing the real one is identity.
    real_body = base64.b64decode(b"".join(real_pem.splitlines()[1:-1]))
    assert json.dumps(real, separators=(",", ":")).encode() == real_body

    def shape(document: dict) -> dict:
        return {
            "kdf": {**document["kdf"], "salt": len(base64.b64decode(document["kdf"]["salt"]))},
            "cipher": {
                **document["cipher"],
                "nonce": len(base64.b64decode(document["cipher"]["nonce"])),
            },
            "ciphertext": len(base64.b64decode(document["ciphertext"])),
        }

    assert json.dumps(shape(ours)) == json.dumps(shape(real))  # same keys, order, sizes
    assert ours_pem.splitlines()[1] == real_pem.splitlines()[1]  # same first PEM line
    assert [len(line) for line in ours_pem.splitlines()] == [
        len(line) for line in real_pem.splitlines()
    ]
    # Fresh salt and nonce every time.
    again = _cosign_document(
        signing.cosign_private_key_pem(ec.generate_private_key(ec.SECP256R1()), None)
    )
    assert again["kdf"]["salt"] != ours["kdf"]["salt"]
    assert again["cipher"]["nonce"] != ours["cipher"]["nonce"]


def test_default_keygen_is_still_pkcs8() -> None:
    private_pem, _ = signing.generate_keypair(None)
    assert private_pem.startswith(b"-----BEGIN PRIVATE KEY-----")


def test_fingerprint_and_hint_are_sha256_of_the_der_public_key(keypair) -> None:
    der = keypair[1].public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    fingerprint = signing.fingerprint(keypair[1])
    assert re.fullmatch(r"sha256:[0-9a-f]{64}", fingerprint)
    assert fingerprint == "sha256:" + hashlib.sha256(der).hexdigest()
    assert base64.b64decode(signing.key_hint(keypair[1])) == hashlib.sha256(der).digest()


# --- real vectors -----------------------------------------------------------------------------


def test_real_bundle_hint_matches_key_hint() -> None:
    key = signing.load_public_key(_read("conformance-key.pub").decode())
    bundle = signing.parse_bundle(_read("conformance-bundle.sigstore.json").decode())
    assert (
        bundle.key_hint == signing.key_hint(key) == "TLMsSDfG3ajPsWge+z/vX5T/zluXnmvbkTkwLIV68Tk="
    )


def test_real_bundle_verifies_and_fails_on_another_blob() -> None:
    key = signing.load_public_key(_read("conformance-key.pub").decode())
    bundle = signing.parse_bundle(_read("conformance-bundle.sigstore.json").decode())
    blob = _read("conformance-a.txt")
    digest = hashlib.sha256(blob).digest()
    assert bundle.digest == digest
    signing.check_bundle_digest(bundle, digest)
    assert signing.verify_digest(key, digest, bundle.signature_b64)

    other = hashlib.sha256(blob + b"tampered").digest()
    assert not signing.verify_digest(key, other, bundle.signature_b64)
    with pytest.raises(InvalidArgument) as raised:
        signing.check_bundle_digest(bundle, other)
    assert raised.value.reason == "SIGSTORE_BUNDLE_DIGEST_MISMATCH"


def _dsse_pae(envelope: dict[str, object]) -> bytes:
    """The bytes a DSSE signature covers (DSSE v1 pre-authentication encoding)."""
    payload_type = str(envelope["payloadType"]).encode()
    payload = base64.b64decode(str(envelope["payload"]))
    return b"DSSEv1 %d %s %d %s" % (len(payload_type), payload_type, len(payload), payload)


def test_real_cosign_signature_verifies_and_fails_on_another_blob() -> None:
    # cosign's verify-blob-attestation fixture: ECDSA P-256 / SHA-256 over the DSSE PAE bytes.
    envelope = json.loads(_read("attest-envelope.json"))
    key = signing.load_public_key(_read("attest-key.pub").decode())
    signature = envelope["signatures"][0]["sig"]
    message = _dsse_pae(envelope)
    assert signing.verify_digest(key, hashlib.sha256(message).digest(), signature)
    assert not signing.verify_digest(key, hashlib.sha256(message + b" ").digest(), signature)
    assert not signing.verify_digest(key, hashlib.sha256(b"some-payload").digest(), signature)


def test_real_rekor_entry_signature_verifies_against_its_digest() -> None:
    # A hashedrekord entry (key-based `cosign sign-blob` upload) from cosign's verify_test.go.
    spec = json.loads(_read("rekor-hashedrekord.json"))["spec"]
    key = signing.load_public_key(base64.b64decode(spec["signature"]["publicKey"]["content"]))
    digest = bytes.fromhex(spec["data"]["hash"]["value"])
    signature = spec["signature"]["content"]
    assert signing.verify_digest(key, digest, signature)
    assert not signing.verify_digest(key, hashlib.sha256(digest).digest(), signature)


# --- bundles ----------------------------------------------------------------------------------


def test_make_bundle_round_trip(keypair, archive: Path) -> None:
    digest = signing.file_sha256(archive)
    signature = signing.sign_digest(keypair[0], digest)
    text = signing.make_bundle(signature, digest, signing.key_hint(keypair[1]))
    raw = json.loads(text)
    assert raw["mediaType"] == "application/vnd.dev.sigstore.bundle.v0.3+json"
    assert raw["messageSignature"]["messageDigest"]["algorithm"] == "SHA2_256"
    assert "dsseEnvelope" not in raw

    bundle = signing.parse_bundle(text)
    assert bundle == signing.BundleSignature(signature, digest, signing.key_hint(keypair[1]))
    assert signing.verify_digest(keypair[1], digest, bundle.signature_b64)


def _bundle(**changes: object) -> dict[str, object]:
    bundle: dict[str, object] = json.loads(_read("conformance-bundle.sigstore.json"))
    bundle.update(changes)
    return {key: value for key, value in bundle.items() if value is not None}


@pytest.mark.parametrize(
    "media_type",
    [
        "application/vnd.dev.sigstore.bundle+json;version=0.3",
        "application/vnd.dev.sigstore.bundle+json;version=0.2",
        "application/vnd.dev.sigstore.bundle+json;version=0.1",
    ],
)
def test_older_media_types_are_accepted(media_type: str) -> None:
    bundle = signing.parse_bundle(json.dumps(_bundle(mediaType=media_type)))
    assert bundle.key_hint


def test_proto_field_names_are_accepted() -> None:
    raw = _bundle()
    renamed = {
        "media_type": raw["mediaType"],
        "verification_material": raw["verificationMaterial"],
        "message_signature": {
            "message_digest": {
                "algorithm": 1,
                "digest": "oM/HEnHW4njlfNMy/5V8P3BD/do1TEy7GQow1W76Ab8=",
            },
            "signature": raw["messageSignature"]["signature"],  # type: ignore[index]
        },
    }
    bundle = signing.parse_bundle(json.dumps(renamed))
    assert bundle.digest == hashlib.sha256(_read("conformance-a.txt")).digest()


def test_bundle_without_message_digest_is_accepted() -> None:
    raw = _bundle()
    raw["messageSignature"] = {"signature": raw["messageSignature"]["signature"]}  # type: ignore[index]
    bundle = signing.parse_bundle(json.dumps(raw))
    assert bundle.digest is None
    signing.check_bundle_digest(bundle, b"\0" * 32)  # nothing to compare against


def _dsse_bundle() -> dict[str, object]:
    # The shape cosign's makeLocalAttestNewBundle builds around its real DSSE envelope.
    envelope = json.loads(_read("attest-envelope.json"))
    return _bundle(messageSignature=None, dsseEnvelope=envelope)


_SIGNATURE = _bundle()["messageSignature"]["signature"]  # type: ignore[index]


@pytest.mark.parametrize(
    ("text", "reason", "expected"),
    [
        ("{not json", "SIGSTORE_BUNDLE_INVALID", "not valid JSON"),
        ("[" * 100_000, "SIGSTORE_BUNDLE_INVALID", "not valid JSON"),
        ("[1, 2]", "SIGSTORE_BUNDLE_INVALID", "JSON object"),
        (
            json.dumps(_bundle(mediaType="application/vnd.dev.sigstore.bundle.v9+json")),
            "SIGSTORE_BUNDLE_UNSUPPORTED",
            "unsupported Sigstore bundle mediaType 'application/vnd.dev.sigstore.bundle.v9+json'",
        ),
        (
            json.dumps(_bundle(mediaType=None)),
            "SIGSTORE_BUNDLE_UNSUPPORTED",
            "mediaType None",
        ),
        (
            json.dumps(_dsse_bundle()),
            "SIGSTORE_BUNDLE_UNSUPPORTED",
            "use a key-based message signature bundle",
        ),
        (
            json.dumps(_bundle(messageSignature=None)),
            "SIGSTORE_BUNDLE_INVALID",
            "no messageSignature",
        ),
        (
            json.dumps(_bundle(messageSignature={"messageDigest": {"algorithm": "SHA2_256"}})),
            "SIGSTORE_BUNDLE_INVALID",
            "messageSignature.signature is missing",
        ),
        (
            json.dumps(_bundle(messageSignature={"signature": "%%%not base64%%%"})),
            "SIGSTORE_BUNDLE_INVALID",
            "messageSignature.signature is not valid base64",
        ),
        (
            json.dumps(
                _bundle(
                    messageSignature={
                        "messageDigest": {
                            "algorithm": "SHA2_384",
                            "digest": base64.b64encode(b"\0" * 48).decode(),
                        },
                        "signature": _SIGNATURE,
                    }
                )
            ),
            "SIGSTORE_BUNDLE_UNSUPPORTED",
            "messageDigest.algorithm is 'SHA2_384'",
        ),
        (
            json.dumps(
                _bundle(
                    messageSignature={
                        "messageDigest": {"algorithm": "SHA2_256", "digest": "AAAA"},
                        "signature": _SIGNATURE,
                    }
                )
            ),
            "SIGSTORE_BUNDLE_INVALID",
            "32-byte SHA-256",
        ),
        (
            json.dumps(_bundle(messageSignature="MEUCIQ")),
            "SIGSTORE_BUNDLE_INVALID",
            "messageSignature must be a JSON object",
        ),
        (
            json.dumps(_bundle(verificationMaterial=None)),
            "SIGSTORE_BUNDLE_INVALID",
            "no verificationMaterial",
        ),
        (
            json.dumps(_bundle(verificationMaterial={"certificate": {"rawBytes": "MIIB"}})),
            "SIGSTORE_BUNDLE_UNSUPPORTED",
            "certificate-based",
        ),
        (
            json.dumps(_bundle(verificationMaterial={"tlogEntries": []})),
            "SIGSTORE_BUNDLE_INVALID",
            "verificationMaterial.publicKey is missing",
        ),
        (
            json.dumps(_bundle(verificationMaterial={"publicKey": {"hint": 42}})),
            "SIGSTORE_BUNDLE_INVALID",
            "hint must be a string",
        ),
        (
            json.dumps(_bundle(padding="x" * (300 << 10))),
            "SIGSTORE_BUNDLE_INVALID",
            "larger than",
        ),
    ],
    ids=[
        "not-json",
        "nested-too-deep",
        "not-object",
        "wrong-media-type",
        "no-media-type",
        "dsse-envelope",
        "no-message-signature",
        "no-signature",
        "bad-signature-base64",
        "digest-not-sha256",
        "digest-wrong-length",
        "message-signature-not-object",
        "no-verification-material",
        "certificate-bundle",
        "no-public-key",
        "hint-not-string",
        "too-large",
    ],
)
def test_parse_bundle_errors_are_precise(text: str, reason: str, expected: str) -> None:
    with pytest.raises(InvalidArgument) as raised:
        signing.parse_bundle(text)
    error = raised.value
    assert error.reason == reason
    assert error.violations[0][0] == "metadata.sigstore_bundle"
    assert expected in error.message
