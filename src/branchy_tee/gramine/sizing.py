"""sgx.enclave_size for a build: as given, or from the runtime's peak memory measured natively
(``measure``) and, where gramine-direct is installed, inside Gramine's LibOS too (``direct_peak``):
the larger of the two."""

from __future__ import annotations

from typing import TYPE_CHECKING

from branchy_tee.gramine import direct_peak, measure

if TYPE_CHECKING:
    from branchy_tee.gramine.config import EnclaveConfig
    from branchy_tee.tee.sealed.header import BundleHeader


def sized(cfg: EnclaveConfig, header: BundleHeader, given_size: int | None, entry: str, log) -> EnclaveConfig:
    """``cfg`` with its enclave size and how it was found (``entry``: predict's entry script)."""
    if given_size:
        return cfg.replace(enclave_size=measure.size_string(given_size), enclave_size_detail={"given": True})
    peak = measure.measure_peak(header, cfg.interpreter, cfg.env_dir, cfg.env, cfg.batch_size, cfg.max_samples, log)
    inflight = cfg.serve_caps.get("max_inflight_mib", 0) << 20  # serve: the measured cap
    sizing = measure.enclave_size(header, peak, cfg.max_samples, inflight=inflight)
    detail = {"given": False, **peak, **sizing, "gramine_direct": None}
    size = sizing["enclave_size"]
    if direct_peak.available():
        cfg = cfg.replace(enclave_size=sizing["enclave_size_str"])  # (the stand-in's manifest needs one)
        inside = direct_peak.measure_direct_peak(cfg, header, entry, log)
        direct = measure.enclave_size(
            header, inside, cfg.max_samples, gramine_share=direct_peak.SGX_ONLY_SHARE, inflight=inflight
        )
        detail["gramine_direct"] = {**inside, **direct}
        size = max(size, direct["enclave_size"])
    return cfg.replace(enclave_size=measure.size_string(size), enclave_size_detail=detail)
