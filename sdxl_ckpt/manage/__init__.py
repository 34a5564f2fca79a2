"""Looking at checkpoints without converting them: ``inspect`` (what is this file?), ``diff`` (how do two differ?),
content hashes, and the non-finite value checks the converters share.

Every function here reads headers / record scans first and touches tensor bytes only when asked, one tensor at a time.
"""
