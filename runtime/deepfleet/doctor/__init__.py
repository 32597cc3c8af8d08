"""`deepfleet doctor`: diagnose one node. Every check returns ok / warn / fail with what it saw and, when not
ok, the fix; the command exits non-zero when any check fails."""
