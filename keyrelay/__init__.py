"""keyrelay command line: the local stack, the components, and the admin API from the shell."""
