/**
 * Runs the system tools the node data plane drives (losetup, mkfs, mount, …). Always asynchronous: the
 * FUSE server answers the kernel on this process's main thread, and a tool that touches a volume file
 * (losetup, mkfs, umount flushing a filesystem) waits for those answers, so a synchronous child would
 * deadlock the process.
 */
import { spawn } from 'node:child_process';

/** A tool that failed: its exit status and what it wrote to stderr. */
export class CommandError extends Error {
  constructor(
    readonly command: string,
    readonly args: readonly string[],
    readonly exitCode: number | null,
    readonly signal: NodeJS.Signals | null,
    readonly stderr: string,
    readonly timedOut: boolean,
  ) {
    const how = timedOut
      ? 'timed out'
      : exitCode !== null
        ? `exited with ${exitCode}`
        : `was killed by ${signal ?? 'a signal'}`;
    super(`${command} ${args.join(' ')} ${how}${stderr ? `: ${stderr}` : ''}`);
    this.name = 'CommandError';
  }
}

export interface CommandResult {
  stdout: string;
  stderr: string;
}

export interface CommandOptions {
  /** Kill the tool (SIGKILL) after this long. Default 60 s: mkfs of a large volume is the slowest case. */
  timeoutMs?: number;
}

/** Longest stderr kept in an error: enough for the tool's message, not for a flood. */
const MAX_STDERR = 4096;

/** Runs `command args…` without a shell; rejects with CommandError unless it exits 0. */
export function runCommand(
  command: string,
  args: readonly string[],
  options: CommandOptions = {},
): Promise<CommandResult> {
  const timeoutMs = options.timeoutMs ?? 60_000;
  return new Promise((resolve, reject) => {
    const child = spawn(command, args, { stdio: ['ignore', 'pipe', 'pipe'], env: { ...process.env, LC_ALL: 'C' } });
    let stdout = '';
    let stderr = '';
    let timedOut = false;
    child.stdout.setEncoding('utf8').on('data', (d: string) => (stdout += d));
    child.stderr.setEncoding('utf8').on('data', (d: string) => {
      if (stderr.length < MAX_STDERR) stderr += d;
    });
    const timer = setTimeout(() => {
      timedOut = true;
      child.kill('SIGKILL');
    }, timeoutMs);
    child.once('error', (err) => {
      clearTimeout(timer);
      reject(err);
    });
    child.once('close', (code, signal) => {
      clearTimeout(timer);
      const err = stderr.trim().slice(0, MAX_STDERR);
      if (code === 0 && !timedOut) resolve({ stdout, stderr: err });
      else reject(new CommandError(command, args, code, signal, err, timedOut));
    });
  });
}
