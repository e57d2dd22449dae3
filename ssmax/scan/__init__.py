"""The selective scan: the public function (:mod:`.api`), its checked inputs (:mod:`.inputs`), the
backends and the resolution of ``"auto"`` (:mod:`.dispatch`), the plain-JAX reference backends
(:mod:`.reference`), sequence parallelism (:mod:`.sequence_parallel`), packed documents
(:mod:`.segments`) and one decoding step (:mod:`.step`)."""

from ssmax.scan.api import selective_scan
from ssmax.scan.dispatch import BACKENDS, Backend
from ssmax.scan.inputs import ScanInputs, check_inputs
from ssmax.scan.segments import segment_ids_from_cu_seqlens, segment_ids_from_lengths
from ssmax.scan.step import selective_state_update

__all__ = ["BACKENDS", "Backend", "ScanInputs", "check_inputs", "segment_ids_from_cu_seqlens",
           "segment_ids_from_lengths", "selective_scan", "selective_state_update"]
