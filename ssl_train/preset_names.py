"""The preset names and the paper's Table 1 sizes, without torch: the stage configuration
checks ``--preset`` with them on the machine that submits a job (``torchx run``), where
importing torch only to spell-check a name would cost seconds.
"""

from __future__ import annotations

# (depth, width multiplier, selective kernels) -> Table 1's "Param (M)" (Keras count_params)
TABLE1 = {
    (50, 1, False): 24, (50, 1, True): 35, (50, 2, False): 94, (50, 2, True): 140,
    (101, 1, False): 43, (101, 1, True): 65, (101, 2, False): 170, (101, 2, True): 257,
    (152, 1, False): 58, (152, 1, True): 89, (152, 2, False): 233, (152, 2, True): 354,
    (152, 3, True): 795,
}  # fmt: skip

TABLE1_NAMES: tuple[str, ...] = tuple(f"r{d}_{w}x_sk{int(sk)}" for d, w, sk in TABLE1)
PRESET_NAMES: tuple[str, ...] = (*TABLE1_NAMES, "tiny", "tiny_student")
