"""Paper sweeps (Table 1, Fig. 2): consumers of jobs and lifecycle only."""
