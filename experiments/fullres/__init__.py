"""Full-resolution reproduction of the CRF-RNN paper's comparison on CamVid and Weizmann horses."""
