"""The first of the forkserver's preloads (launch/process.py): the server ignores Ctrl-C from its start.
Ctrl-C is the launching process's to handle (it keeps every finished row and says how to resume);
multiprocessing's forkserver ignores SIGINT itself only once its preloads are imported, and a Ctrl-C
during them (torch's import, about 2 s) printed the server's KeyboardInterrupt traceback beside the
run's own lines. Nothing else is imported here, so the window before it is the interpreter's start."""
import signal

signal.signal(signal.SIGINT, signal.SIG_IGN)
