"""One module per survey format fmb reads: its schema (columns, grids, classes) and its reader.

- `euclid_desi`: the Euclid + DESI matched sample (AstroPT, AION, AstroCLIP fine-tuning);
- `astroclip`: the AstroCLIP DESI x Legacy Survey HDF5 cross-match;
- `astrom3`: the AstroM3 variable-star sample;
- `splus`: S-PLUS hypercube fields (astromodal).

Synthetic generators (`fmb.data.synth`) and model families import from here, never the other way.
"""
