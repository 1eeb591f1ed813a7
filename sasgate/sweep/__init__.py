"""`sasgate sweep`: a grid of DVC experiments as a submitit job array (Slurm, or this machine).

Each job clones the repository at the sweep's commit, pulls what its point needs from the DVC
remote, runs `dvc exp run` for its point and pushes the experiment (git ref through the git remote,
outputs through the DVC remote); `collect` pulls them back. ARCHITECTURE.md, "Sweeps".
"""
