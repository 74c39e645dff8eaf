"""The `infergate` command line (mirrors eascmd)."""
