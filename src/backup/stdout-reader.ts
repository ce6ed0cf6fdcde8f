/**
 * stdout read through a pipe whose reader went away (`cbt-csi metadata allocated … | head -1`): each later
 * write fails with EPIPE, which Node raises as an 'error' event on process.stdout and, unhandled, as a crash
 * with a stack trace. Like other Unix tools, the command stops writing instead and exits 0: the reader had
 * what it wanted.
 */
let gone = false;
let watching = false;

/** Starts watching stdout for a reader that went away; call before the first write. */
export function watchStdoutReader(): void {
  if (watching) return;
  watching = true;
  process.stdout.on('error', (err: NodeJS.ErrnoException) => {
    gone = true;
    if (err.code === 'EPIPE') return;
    // Any other write failure (a full disk behind a redirect) is a failure of the command.
    process.stderr.write(`cbt-csi: cannot write to stdout: ${err.message}\n`);
    process.exitCode = 1;
  });
}

/** Whether stdout can no longer be written: a listing stops at once. */
export function stdoutReaderGone(): boolean {
  return gone;
}
