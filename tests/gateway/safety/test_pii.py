"""The PII member: what it flags, with which kind and span, and what it leaves alone."""

from __future__ import annotations

import time

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gateway.safety.classifier import Classifier
from gateway.safety.members.pii import DEFAULT_KINDS, PiiClassifier, PiiKind
from gateway.safety.normalize import normalize
from gateway.safety.taxonomy import Shield
from gateway.safety.verdict import Detection, Finding

# Secrets are assembled from pieces so that secret scanners do not flag this file. Each
# has its provider's documented prefix and length; none is a live credential.
AWS_KEY = "AKIA" + "IOSFODNN7EXAMPLE"  # AWS's documentation example
GITHUB_CLASSIC = "gh" + "p_" + "a1B2c3D4e5F6g7H8i9J0k1L2m3N4o5P6q7R8"
GITHUB_FINE_GRAINED = "github" + "_pat_" + "11ABCDEFG0123456789abc" + "_" + "x" * 59
OPENAI_LEGACY = "sk" + "-" + "A1b2C3d4E5f6G7h8I9j0" + "T3BlbkFJ" + "K1l2M3n4O5p6Q7r8S9t0"
OPENAI_PROJECT = "sk" + "-proj-" + "Ab3_" * 20 + "T3BlbkFJ" + "Zy9-" * 20
ANTHROPIC = "sk" + "-ant-api03-" + "q" * 93 + "AA"
SLACK = "xo" + "xb-" + "123456789012-1234567890123-AbCdEfGhIjKlMnOpQrStUvWx"
GOOGLE = "AI" + "za" + "SyA1234567890abcdefghijklmnopqrstuv"
STRIPE_SECRET = "sk" + "_live_" + "4eC39HqLyjWDarjtT1zdp7dc"
STRIPE_RESTRICTED = "rk" + "_live_" + "51H8aBcDeFgHiJkLmNoPqRsTu"
JWT = (  # jwt.io's example token
    "eyJhbGciOiJIUzI1NiIsInR5cCI6IkpXVCJ9"
    ".eyJzdWIiOiIxMjM0NTY3ODkwIiwibmFtZSI6IkpvaG4gRG9lIiwiaWF0IjoxNTE2MjM5MDIyfQ"
    ".SflKxwRJSMeKKF2QT4fwpMeJf36POk6yJV_adQssw5c"
)
PEM_BLOCK = (
    "-----BEGIN RSA " + "PRIVATE KEY-----\n"
    "MIIEowIBAAKCAQEAu1SU1LfVLPHCozMxH2Mo4lgOEePzNm0tRgeLezV6ffAt0gun\n"
    "VTLw7onLRnrq0/IzW7yWR7QkrmBL7jTKEn5u+qKhbwKfBstIs+bMY2Zkp18gnTxK\n"
    "-----END RSA " + "PRIVATE KEY-----"
)
PEM_TRUNCATED = (
    "-----BEGIN OPENSSH " + "PRIVATE KEY-----\n"
    "b3BlbnNzaC1rZXktdjEAAAAABG5vbmUAAAAEbm9uZQAAAAAAAAABAAAAMwAAAAtzc2gtZW\n"
    "QyNTUxOQAAACBhc2RmYXNkZmFzZGZhc2RmYXNkZmFzZGZhc2RmYXNkZmFzZA=="
)

EVERYTHING = PiiClassifier(kinds=frozenset(PiiKind))
DEFAULT = PiiClassifier()


def detect(text: str, classifier: PiiClassifier = DEFAULT) -> Detection:
    [detection] = classifier.classify([normalize(text)])
    return detection


def finding(kind: PiiKind, light: str, matched: str) -> Finding:
    start = light.index(matched)
    return Finding(label=Shield.PII, kind=kind.value, start=start, end=start + len(matched))


POSITIVES = [
    # (text, kind, the exact text of the span)
    ("Write to john.doe+news@example.co.uk please", PiiKind.EMAIL, "john.doe+news@example.co.uk"),
    ("mailto:ops@mail.example.org.", PiiKind.EMAIL, "ops@mail.example.org"),
    ("Call (415) 555-2671 now", PiiKind.PHONE, "(415) 555-2671"),
    ("my cell is 415.555.2671", PiiKind.PHONE, "415.555.2671"),
    ("Ring +44 20 7946 0958 tomorrow", PiiKind.PHONE, "+44 20 7946 0958"),
    ("Berlin office: +49 30 901820", PiiKind.PHONE, "+49 30 901820"),
    ("card 4111 1111 1111 1111 exp 12/25", PiiKind.CREDIT_CARD, "4111 1111 1111 1111"),
    ("Mastercard 5555-5555-5555-4444.", PiiKind.CREDIT_CARD, "5555-5555-5555-4444"),
    ("Amex 3782 822463 10005 please", PiiKind.CREDIT_CARD, "3782 822463 10005"),
    ("pay with 4012888888881881", PiiKind.CREDIT_CARD, "4012888888881881"),
    ("Discover 6011111111111117 ok", PiiKind.CREDIT_CARD, "6011111111111117"),
    ("IBAN DE89 3704 0044 0532 0130 00 thanks", PiiKind.IBAN, "DE89 3704 0044 0532 0130 00"),
    ("send to GB82WEST12345698765432", PiiKind.IBAN, "GB82WEST12345698765432"),
    ("Konto FR1420041010050500013M02606.", PiiKind.IBAN, "FR1420041010050500013M02606"),
    ("Norway NO9386011117947 (15 chars)", PiiKind.IBAN, "NO9386011117947"),
    ("SSN 123-45-6789 on file", PiiKind.US_SSN, "123-45-6789"),
    ("ssn: 078 05 1121", PiiKind.US_SSN, "078 05 1121"),
    ("client at 8.8.8.8 retried", PiiKind.IP_ADDRESS, "8.8.8.8"),
    (f"aws_access_key_id = {AWS_KEY}", PiiKind.AWS_ACCESS_KEY, AWS_KEY),
    (f"export GH_TOKEN={GITHUB_CLASSIC}", PiiKind.GITHUB_TOKEN, GITHUB_CLASSIC),
    (f"token: {GITHUB_FINE_GRAINED}", PiiKind.GITHUB_TOKEN, GITHUB_FINE_GRAINED),
    (f'OPENAI_API_KEY="{OPENAI_LEGACY}"', PiiKind.OPENAI_KEY, OPENAI_LEGACY),
    (f"key {OPENAI_PROJECT} works", PiiKind.OPENAI_KEY, OPENAI_PROJECT),
    (f"x-api-key: {ANTHROPIC}", PiiKind.ANTHROPIC_KEY, ANTHROPIC),
    (f"SLACK_BOT_TOKEN={SLACK}", PiiKind.SLACK_TOKEN, SLACK),
    (f"maps key {GOOGLE}.", PiiKind.GOOGLE_API_KEY, GOOGLE),
    (f"stripe.api_key = '{STRIPE_SECRET}'", PiiKind.STRIPE_KEY, STRIPE_SECRET),
    (f"restricted {STRIPE_RESTRICTED}", PiiKind.STRIPE_KEY, STRIPE_RESTRICTED),
    (f"Authorization: Bearer {JWT}.", PiiKind.JWT, JWT),
    (f"my key:\n{PEM_BLOCK}\nthanks", PiiKind.PRIVATE_KEY, PEM_BLOCK),
    (f"cut off:\n{PEM_TRUNCATED}\n\nWhat is wrong?", PiiKind.PRIVATE_KEY, PEM_TRUNCATED),
]


@pytest.mark.parametrize(("text", "kind", "matched"), POSITIVES)
def test_each_kind_is_found_with_its_exact_span(text: str, kind: PiiKind, matched: str) -> None:
    light = normalize(text).light
    detection = detect(text, EVERYTHING)
    assert detection.findings == (finding(kind, light, matched),)
    assert detection.scores == {Shield.PII: 1.0}


NEGATIVES = [
    "card 4111 1111 1111 1112 fails Luhn",
    "ref 4111111111111112",
    "1234567812345670 passes Luhn but is on no card network",
    "Your order #A-2024-000123 has shipped",
    "Order ORD-20240115-0042 ships on Monday",
    "The release date is 2024-01-15.",
    "Upgrade to version 1.2.3.4 today",  # ip_address is off by default
    "pip install sk-learn, then run the risk-free task-sk-list script",
    "a risk-" + "A" * 48 + " appetite",  # sk- inside an ordinary word
    "IBAN DE89 3704 0044 0532 0130 01 has a bad checksum",
    "GB82WEST1234569876543 is one character short",
    "SSN 000-12-3456 is never issued",
    "SSN 666-12-3456 is never issued",
    "SSN 912-34-5678 is never issued",
    "SSN 123-00-4567 is never issued",
    "SSN 123-45-0000 is never issued",
    "SSN 123-45 6789 mixes separators",
    "call me at 5",
    "dial 555-0100",
    "ISBN 978-3-16-148410-0",
    "meet at 10:30:00 in room 42",
    "Total: $1,234,567.89",
    "AKIA" + "IOSFODNN7EXAMPL is one character short",
    "gh" + "p_" + "a" * 35 + " is one character short",
    "eyJhbGciOi.not-a.token",
    "-----BEGIN PUBLIC KEY-----\nMFkwEwYHKoZIzj0CAQYIKoZIzj0DAQcDQgAE\n-----END PUBLIC KEY-----",
    "john at example dot com",
    "",
]


@pytest.mark.parametrize("text", NEGATIVES)
def test_look_alikes_are_not_flagged(text: str) -> None:
    detection = detect(text)
    assert detection.findings == ()
    assert detection.scores == {Shield.PII: 0.0}


def test_a_benign_sentence_scores_zero() -> None:
    detection = detect("Could you summarise the plot of Moby-Dick in three sentences?")
    assert detection == Detection(scores={Shield.PII: 0.0}, findings=())


def test_a_sentence_with_two_kinds_reports_both_in_order() -> None:
    text = "Reach me at jane@example.com or charge 5555 5555 5555 4444."
    light = normalize(text).light
    assert detect(text).findings == (
        finding(PiiKind.EMAIL, light, "jane@example.com"),
        finding(PiiKind.CREDIT_CARD, light, "5555 5555 5555 4444"),
    )


def test_kinds_restricts_what_is_reported() -> None:
    text = "Mail jane@example.com or call (415) 555-2671."
    light = normalize(text).light
    only_email = PiiClassifier(kinds=frozenset({PiiKind.EMAIL}))
    only_phone = PiiClassifier(kinds=frozenset({PiiKind.PHONE}))
    assert detect(text, only_email).findings == (finding(PiiKind.EMAIL, light, "jane@example.com"),)
    assert detect(text, only_phone).findings == (finding(PiiKind.PHONE, light, "(415) 555-2671"),)
    secrets_only = PiiClassifier(kinds=frozenset({PiiKind.AWS_ACCESS_KEY, PiiKind.JWT}))
    assert detect(text, secrets_only).scores == {Shield.PII: 0.0}


def test_ip_addresses_are_off_by_default_and_public_only_when_on() -> None:
    assert PiiKind.IP_ADDRESS not in DEFAULT_KINDS
    assert DEFAULT.kinds == DEFAULT_KINDS
    text = "from 8.8.8.8 via 192.168.1.1 and 127.0.0.1, not 300.1.1.1"
    light = normalize(text).light
    assert detect(text).findings == ()
    assert detect(text, EVERYTHING).findings == (finding(PiiKind.IP_ADDRESS, light, "8.8.8.8"),)


def test_a_card_number_is_reported_as_a_card_only() -> None:
    text = "number 4111 1111 1111 1111"
    light = normalize(text).light
    assert detect(text).findings == (finding(PiiKind.CREDIT_CARD, light, "4111 1111 1111 1111"),)
    # Even with only phones asked for, the card's digits are not a phone number.
    assert detect(text, PiiClassifier(kinds=frozenset({PiiKind.PHONE}))).findings == ()


@pytest.mark.parametrize(
    "email",
    [
        "4155552671@example.com",  # the phone candidate starts where the e-mail does
        "jdoe4155552671@example.com",  # ... starts inside it
        "jane+14155552671@example.com",
        "jane.doe+1-415-555-2671@example.com",
    ],
)
def test_digits_inside_an_email_are_not_a_phone(email: str) -> None:
    text = f"write to {email} today"
    light = normalize(text).light
    assert detect(text).findings == (finding(PiiKind.EMAIL, light, email),)


def test_a_card_and_a_phone_side_by_side_are_both_kept() -> None:
    text = "4111 1111 1111 1111 (415) 555-2671"
    light = normalize(text).light
    assert detect(text).findings == (
        finding(PiiKind.CREDIT_CARD, light, "4111 1111 1111 1111"),
        finding(PiiKind.PHONE, light, "(415) 555-2671"),
    )


def test_default_region_decides_national_phone_numbers() -> None:
    text = "ring 020 7946 0958 after six"
    light = normalize(text).light
    assert detect(text).findings == ()
    assert detect(text, PiiClassifier(default_region="gb")).findings == (
        finding(PiiKind.PHONE, light, "020 7946 0958"),
    )


@pytest.mark.parametrize(
    ("text", "kind", "matched"),
    [
        ("ｊｏｈｎ\u200b@ｅｘａｍｐｌｅ．ｃｏｍ", PiiKind.EMAIL, "john@example.com"),
        ("mail j\u200bo\u200dhn@exa\u2060mple.com now", PiiKind.EMAIL, "john@example.com"),
        ("card ４１１１ １１１１ １１１１ １１１１", PiiKind.CREDIT_CARD, "4111 1111 1111 1111"),
        ("ssn １２３-４５-６７８９", PiiKind.US_SSN, "123-45-6789"),
        ("AKIA\u200bIOSFODNN7EXAMPLE", PiiKind.AWS_ACCESS_KEY, AWS_KEY),
    ],
)
def test_unicode_obfuscation_is_undone_before_detection(
    text: str, kind: PiiKind, matched: str
) -> None:
    light = normalize(text).light
    assert detect(text).findings == (finding(kind, light, matched),)


def test_findings_never_carry_the_matched_text() -> None:
    detection = detect(f"key {STRIPE_SECRET} and ssn 123-45-6789")
    assert [f.kind for f in detection.findings] == ["stripe_key", "us_ssn"]
    assert STRIPE_SECRET not in repr(detection)
    assert "6789" not in repr(detection)


def test_one_detection_per_text_in_order() -> None:
    texts = [normalize(t) for t in ("hello there", "jane@example.com", "", "123-45-6789")]
    scores = [d.scores[Shield.PII] for d in DEFAULT.classify(texts)]
    assert scores == [0.0, 1.0, 0.0, 1.0]
    assert DEFAULT.classify([]) == []


def test_it_is_a_classifier_for_the_pii_shield() -> None:
    member = PiiClassifier(id="pii-strict")
    assert isinstance(member, Classifier)
    assert member.id == "pii-strict"
    assert member.labels == frozenset({Shield.PII})


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"kinds": frozenset()}, "at least one"),
        ({"default_region": "XX"}, "unknown phone region"),
        ({"id": ""}, "must not be empty"),
        ({"kinds": frozenset({"postcode"})}, "postcode"),
    ],
)
def test_bad_options_raise(options: dict[str, object], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        PiiClassifier(**options)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "text",
    [
        "1 " * 20_000,
        "1234-" * 8_000,
        "a." * 20_000 + "@",
        "x@" + "a." * 20_000,
        "eyJ" + "a" * 40_000,
        ("-----BEGIN " + "PRIVATE KEY-----") * 2_500,
        "DE89 " * 8_000,
        "sk" + "-" + "a" * 40_000 + "_",
    ],
    ids=["spaced", "dashed", "email-local", "email-domain", "jwt", "pem", "iban", "sk"],
)
def test_adversarial_input_stays_linear(text: str) -> None:
    started = time.perf_counter()
    detect(text, EVERYTHING)
    assert time.perf_counter() - started < 5.0  # quadratic backtracking would take minutes


# Text drawn from the characters these formats are made of, so that near-misses occur.
_PII_ALPHABET = st.sampled_from(list("0123456789 -+.()@_/:=\n\tABDEGIKSTXaekopsxyzJ\u200bＡ１"))
_TEXTS = st.one_of(st.text(max_size=300), st.text(_PII_ALPHABET, max_size=300))


@settings(max_examples=300, deadline=None)
@given(_TEXTS)
def test_classify_is_total_and_its_findings_are_well_formed(text: str) -> None:
    normalized = normalize(text)
    [detection] = EVERYTHING.classify([normalized])
    score = detection.scores[Shield.PII]
    assert score in (0.0, 1.0)
    assert (score == 1.0) == bool(detection.findings)
    previous_end = 0
    for item in detection.findings:
        assert item.label is Shield.PII
        assert PiiKind(item.kind)
        assert previous_end <= item.start < item.end <= len(normalized.light)
        previous_end = item.end
