"""structvi."""
