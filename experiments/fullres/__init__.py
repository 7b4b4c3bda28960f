"""Full-resolution reproduction of CRF-RNN's claim (FCN < FCN + CRF afterwards < CRF-RNN end to end) on CamVid and
Weizmann horses: the unary network runs at reduced resolution, its logits are upsampled to the image, the CRF runs
and IU is scored at full resolution.

Arms (one run folder per data set and seed, see ``settings.ARMS``): (a) FCN, (a+) FCN fine-tuned without CRF (the
control), (b) FCN + grid-searched dense-CRF post-processing, (c) CRF-RNN end to end from (a), (d) (c) with the
kernel bandwidths learned, and a CRF-only arm over the frozen FCN's cached logits.

    python -m experiments.fullres reproduce      # every data set and seed, then the report (make reproduce)
    python -m experiments.fullres run --dataset camvid --seed 0 --run-dir runs/fullres/camvid/seed0
    python -m experiments.fullres report --runs runs/fullres
"""
