"""The CRL benchmark does real work: a CRL over one frame crosses two linked cores in
pieces and is applied whole, and the fetch goes to a real CA over HTTPS."""

from __future__ import annotations

from pathlib import Path

from cryptography.hazmat.primitives.asymmetric import ec

from bench import crl as crl_bench
from trustmesh.mesh.link import MAX_FRAME

REVOKED = 40_000  # over one frame, and quick


def test_a_quick_run_reports_both_figures_against_the_anchor() -> None:
    results = crl_bench.run(revoked=REVOKED, rounds=1)
    assert [r.metric for r in results] == ["crl_link_apply_ms", "crl_fetch_apply_ms"]
    for result in results:
        assert result.unit == "ms"
        assert result.value > 0 and result.anchor_value > 0
        assert result.paired_ratio is not None
        assert "cryptography" in result.anchor


def test_the_rig_crl_is_over_a_frame_and_each_round_applies_it(tmp_path: Path) -> None:
    rig = crl_bench.CrlRig(tmp_path, REVOKED)
    try:
        assert len(rig.der) > MAX_FRAME
        assert crl_bench.link_round(rig) > 0
        issuer = rig.ca.issuing_cert.public_key()
        assert isinstance(issuer, ec.EllipticCurvePublicKey)
        assert crl_bench.anchor_parse(rig.der, issuer) == REVOKED
    finally:
        rig.close()
