"""The AstroCLIP cross-match (DESI EDR spectra x Legacy Survey DR9 images) HDF5 file: schema.

`astroclip_desi.1.1.5.h5` upstream (~60 GB, ~150k galaxies), up to 10 groups; per object (reference
data-formats.md section 2): `image` (152, 152, 3) float32 g, r, z flux in nanomaggies, `spectrum`
(7781, 1) float32 on the DESI grid, `redshift` float32, `targetid` int64. Upstream split: the first
80% of every group is train, the rest test. Read with fmb.data.hdf5.HDF5Source.
"""

from __future__ import annotations

FILE_NAME = "astroclip_desi.h5"  # what the synthetic kind writes; real files keep their own name
FIELDS = ("image", "spectrum", "redshift", "targetid")
BANDS = ("g", "r", "z")  # image planes, in this order
TRAIN_FRACTION = 0.8  # of every group, the upstream train part
