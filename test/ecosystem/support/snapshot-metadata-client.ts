/**
 * Our Go client of the SnapshotMetadata service (scripts/ecosystem/snapshot-metadata-client, on the upstream
 * iterator library), run as a backup application would: `list` prints one JSON record a response message
 * and a summary line, `verify` rebuilds a snapshot from the listed blocks; a failure is a JSON line on
 * stderr with the gRPC code.
 */
import { execFile, spawnSync } from 'node:child_process';
import type { Extent } from '../../../src/client/index.js';
import { tool } from '../tools.js';

/** One GetMetadata* response message as the client prints it. */
export interface GoRecord {
  record: number;
  block_metadata_type: string;
  volume_capacity_bytes: number;
  block_metadata: { byte_offset: number; size_bytes: number }[];
}

export interface GoClientResult {
  status: number;
  records: GoRecord[];
  summary: Record<string, unknown>;
  /** The error line (e.g. `{ code: 'Unavailable', error: '…' }`), or null when it exited 0. */
  error: Record<string, unknown> | null;
}

const MAX_OUTPUT = 64 * 1024 * 1024;
const TIMEOUT_MS = 60_000;

const argv = (command: 'list' | 'verify', args: string[], kubeconfig: string) => [
  command,
  '--kubeconfig',
  kubeconfig,
  ...args,
];

function parse(status: number, stdout: string, stderr: string, failure?: string): GoClientResult {
  const lines = stdout
    .trim()
    .split('\n')
    .filter(Boolean)
    .map((l) => JSON.parse(l) as Record<string, unknown>);
  const errLine = stderr.trim().split('\n').at(-1) ?? '';
  let error: Record<string, unknown> | null = null;
  if (status !== 0) {
    try {
      error = JSON.parse(errLine) as Record<string, unknown>;
    } catch {
      error = { error: stderr || failure };
    }
  }
  return {
    status,
    records: lines.filter((l) => 'record' in l) as unknown as GoRecord[],
    summary: lines.at(-1) ?? {},
    error,
  };
}

/** Runs our Go client as `kubeconfig`'s ServiceAccount, blocking this process until it exits. */
export function goClient(command: 'list' | 'verify', args: string[], kubeconfig: string): GoClientResult {
  const r = spawnSync(tool('snapshot-metadata-client'), argv(command, args, kubeconfig), {
    encoding: 'utf8',
    maxBuffer: MAX_OUTPUT,
    timeout: TIMEOUT_MS,
  });
  return parse(r.status ?? -1, r.stdout ?? '', r.stderr ?? '', r.error?.message);
}

/** As goClient, without blocking: for when this process serves part of the path (a Service stand-in). */
export function goClientAsync(command: 'list' | 'verify', args: string[], kubeconfig: string): Promise<GoClientResult> {
  return new Promise((resolve) => {
    execFile(
      tool('snapshot-metadata-client'),
      argv(command, args, kubeconfig),
      { encoding: 'utf8', maxBuffer: MAX_OUTPUT, timeout: TIMEOUT_MS },
      (err, stdout, stderr) => {
        const status = err ? (typeof err.code === 'number' ? err.code : -1) : 0;
        resolve(parse(status, stdout, stderr, err?.message));
      },
    );
  });
}

export const goExtents = (records: GoRecord[]): Extent[] =>
  records.flatMap((r) => r.block_metadata.map((t) => ({ offset: t.byte_offset, length: t.size_bytes })));
