"""The AstroM3 variable-star sample (AstroM3Processed parquet: train / validation / test): schema.

One row (the synthetic kind `astrom3` writes the same):
  photometry  list<list<float>> (N, 3): time (HJD), flux, flux_err (ASAS-SN V band)
  spectra     list<list<float>> (M, 3): wavelength (Angstrom), flux, flux_err (LAMOST)
  metadata    list<float> (38): the 34 catalogue values of METADATA_NAMES, then the 4
              photometric features (amplitude, period, lksl_statistic, rfr_score)
  label       string, one of CLASSES
  object_id   int64 (optional; the row index is used when absent)
"""

from __future__ import annotations

# Alphabetical, as upstream numbers the classes.
CLASSES = ["DSCT", "EA", "EB", "EW", "HADS", "M", "ROT", "RRAB", "RRC", "SR"]
METADATA_NAMES = [
    "mean_vmag", "phot_g_mean_mag", "e_phot_g_mean_mag", "phot_bp_mean_mag", "e_phot_bp_mean_mag",
    "phot_rp_mean_mag", "e_phot_rp_mean_mag", "bp_rp", "parallax", "parallax_error", "parallax_over_error",
    "pmra", "pmra_error", "pmdec", "pmdec_error", "j_mag", "e_j_mag", "h_mag", "e_h_mag", "k_mag", "e_k_mag",
    "w1_mag", "e_w1_mag", "w2_mag", "e_w2_mag", "w3_mag", "w4_mag", "j_k", "w1_w2", "w3_w4", "pm", "ruwe",
    "l", "b",
    "amplitude", "period", "lksl_statistic", "rfr_score",
]
PERIOD_INDEX = METADATA_NAMES.index("period")
N_CATALOGUE = METADATA_NAMES.index("amplitude")  # 34 catalogue values, then the 4 photometric features
