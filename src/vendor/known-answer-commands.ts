/** `cbt-csi generate` and `cbt-csi check`: the command-line side of the known answers. */
import fs from 'node:fs';
import path from 'node:path';
import { type Command, InvalidArgumentError, Option } from 'commander';
import { UsageError, kubeconfigOption, namespaceOption, oneMode } from '../cli-modes.js';
import { formatEndpoint, parseEndpoint } from '../config.js';
import {
  CEPH_RBD_DEFAULT_OBJECT_SIZE,
  HOSTPATH_BLOCK_BYTES,
  METADATA_PROFILES,
  parseObjectSize,
  type MetadataProfileName,
} from '../csi/metadata-profiles.js';
import type { ResumeListener } from '../client/index.js';
import { appendAnswerRun, readAnswerRuns } from './answers.js';
import { checkAnswers, formatReport } from './check.js';
import { csiMetadataReader, type MetadataReader } from './csi-metadata-reader.js';
import { generate, openPathTarget } from './generate.js';
import { kubernetesMetadataReader } from './kubernetes-metadata-reader.js';
import { PATTERNS, type PatternName } from './patterns.js';

function integerArg(min: number) {
  return (value: string): number => {
    const n = Number(value);
    if (value.trim() === '' || !Number.isSafeInteger(n) || n < min)
      throw new InvalidArgumentError(`expected an integer of at least ${min}`);
    return n;
  };
}

function blockSizeArg(value: string): number {
  const n = integerArg(4096)(value);
  if ((n & (n - 1)) !== 0 || n > 1024 * 1024)
    throw new InvalidArgumentError('expected a power of two from 4096 to 1048576');
  return n;
}

function objectSizeArg(value: string): number {
  try {
    return parseObjectSize(value);
  } catch (err) {
    throw new InvalidArgumentError((err as Error).message);
  }
}

/**
 * A time: milliseconds since the epoch, nanoseconds (17 digits or more: a VolumeSnapshotContent's
 * status.creationTime), or an ISO 8601 / RFC 3339 string.
 */
function timeArg(value: string): number {
  const ms = /^\d{17,}$/.test(value)
    ? Number(BigInt(value) / 1_000_000n)
    : /^\d+$/.test(value)
      ? Number(value)
      : Date.parse(value);
  if (!Number.isFinite(ms)) throw new InvalidArgumentError('expected milliseconds since the epoch or an ISO 8601 time');
  return ms;
}

interface GenerateFlags {
  target: string;
  seed: number;
  pattern: PatternName;
  count: number;
  blockSize: number;
  answers: string;
}

interface CheckFlags {
  answers: string;
  snapshot: string;
  base?: string;
  restored?: string;
  endpoint?: string;
  namespace?: string;
  kubeconfig?: string;
  profile: MetadataProfileName;
  objectSize: number;
  granularity?: number;
  createdAt?: number;
  baseCreatedAt?: number;
  metadata: boolean;
  json?: boolean;
}

export function registerKnownAnswerCommands(program: Command): void {
  program
    .command('generate')
    .description('write a seeded pattern to a block device or file and append exactly what changed to an answers file')
    .requiredOption(
      '--target <path>',
      'block device (trims: BLKDISCARD) or regular file (trims: punch-hole); must exist',
    )
    .requiredOption('--seed <n>', 'seed of the pattern', integerArg(0))
    .addOption(
      new Option('--pattern <pattern>', 'what to write').choices(PATTERNS as unknown as string[]).makeOptionMandatory(),
    )
    .requiredOption('--count <n>', 'operations (sequential: blocks)', integerArg(1))
    .option('--block-size <bytes>', 'bytes per block written and hashed', blockSizeArg, 4096)
    .requiredOption('--answers <file>', 'answers file (JSON lines), appended to')
    .action(async (flags: GenerateFlags) => {
      const target = await openPathTarget(flags.target);
      try {
        const run = await generate(
          { pattern: flags.pattern, seed: flags.seed, count: flags.count, blockSize: flags.blockSize },
          target,
        );
        appendAnswerRun(flags.answers, run);
        const blocks = run.sha256.length;
        process.stdout.write(
          `${flags.pattern} seed ${flags.seed}: ${blocks} block(s) changed in ${run.changed.length} extent(s), ` +
            `${run.trimmed.length} of them trimmed; finished at ${new Date(run.finishedAtMs).toISOString()}; answers appended to ${flags.answers}\n`,
        );
      } finally {
        await target.close();
      }
    });

  program
    .command('check')
    .description(
      "compare the driver's allocated (or delta, with --base) blocks and a restored copy with the answers; exit 0 only if all hold",
    )
    .requiredOption('--answers <file>', 'answers file written by generate')
    .requiredOption(
      '--snapshot <id>',
      'CSI snapshot ID (VolumeSnapshotContent status.snapshotHandle); with --namespace, the VolumeSnapshot',
    )
    .option(
      '--base <id>',
      'base snapshot ID (with --namespace, the VolumeSnapshot): check GetMetadataDelta instead of GetMetadataAllocated',
    )
    .option(
      '--restored <path>',
      "block device or file holding the vendor's restore of --snapshot: every recorded block's SHA-256 is compared",
    )
    .option(
      '--endpoint <endpoint>',
      "the driver's CSI endpoint, unix:///path/csi.sock or tcp://HOST:PORT (env CSI_ENDPOINT; default .state/csi.sock)",
    )
    .addOption(namespaceOption())
    .addOption(kubeconfigOption())
    .addOption(
      new Option('--profile <profile>', "the snapshot's metadataProfile: how much coarser than exact it may answer")
        .choices(METADATA_PROFILES as string[])
        .default('exact'),
    )
    .option('--object-size <bytes>', 'ceph-rbd profile: its objectSize', objectSizeArg, CEPH_RBD_DEFAULT_OBJECT_SIZE)
    .option(
      '--granularity <bytes>',
      'override: bytes within which extra reporting is allowed (e.g. the volume block size)',
      integerArg(4096),
    )
    .option(
      '--created-at <time>',
      "when --snapshot was cut (ms, ns, or ISO 8601); default: ask the driver (with --namespace: the content's status.creationTime)",
    )
    .option('--base-created-at <time>', 'when --base was cut; default: as for --created-at')
    .option('--no-metadata', 'skip the driver comparison; check only --restored (needs --created-at)')
    .option('--json', 'print the full report as JSON')
    .action(async (flags: CheckFlags) => {
      try {
        // Where the snapshots are asked is settled before anything is read.
        oneMode(flags);
      } catch (err) {
        if (!(err instanceof UsageError)) throw err;
        process.stderr.write(`cbt-csi check: ${err.message}\n`);
        process.exitCode = 2;
        return;
      }
      const createdAt = flags.createdAt === undefined ? undefined : timeArg(String(flags.createdAt));
      const baseCreatedAt = flags.baseCreatedAt === undefined ? undefined : timeArg(String(flags.baseCreatedAt));
      const runs = readAnswerRuns(flags.answers);
      if (runs.length === 0) throw new Error(`${flags.answers} holds no generate runs`);
      const needDriver =
        flags.metadata || createdAt === undefined || (flags.base !== undefined && baseCreatedAt === undefined);
      // The backup toolkit's client reads the metadata: cut streams are resumed as a backup's would be.
      const onResume: ResumeListener = ({ offset, attempt, delayMs, error }) =>
        process.stderr.write(
          `check: stream cut (${error instanceof Error ? error.message : String(error)}); resuming at byte ${offset} in ${delayMs} ms (attempt ${attempt})\n`,
        );
      let reader: MetadataReader | undefined;
      if (needDriver && flags.namespace)
        reader = kubernetesMetadataReader({ namespace: flags.namespace, kubeconfig: flags.kubeconfig, onResume });
      else if (needDriver) {
        const endpoint = formatEndpoint(
          parseEndpoint(flags.endpoint ?? process.env.CSI_ENDPOINT ?? path.resolve('.state', 'csi.sock')),
        );
        reader = csiMetadataReader(endpoint, { onResume });
      }
      let restored: fs.promises.FileHandle | undefined;
      try {
        const snapshotCreatedAtMs = createdAt ?? (await reader!.snapshotCreatedAtMs(flags.snapshot));
        const baseCreatedAtMs =
          flags.base === undefined ? undefined : (baseCreatedAt ?? (await reader!.snapshotCreatedAtMs(flags.base)));
        const listing = flags.metadata ? await reader!.extents(flags.snapshot, flags.base) : undefined;
        restored = flags.restored ? await fs.promises.open(flags.restored, 'r') : undefined;
        const granularity =
          flags.granularity ??
          (flags.profile === 'ceph-rbd' ? flags.objectSize : flags.profile === 'hostpath' ? HOSTPATH_BLOCK_BYTES : 0);
        const handle = restored;
        const report = await checkAnswers({
          runs,
          snapshotCreatedAtMs,
          ...(baseCreatedAtMs === undefined ? {} : { baseCreatedAtMs }),
          ...(listing ? { reported: listing.extents, resumes: listing.resumes } : {}),
          granularity,
          ...(handle
            ? {
                readRestored: async (offset: number, length: number) => {
                  const buf = Buffer.alloc(length);
                  const { bytesRead } = await handle.read(buf, 0, length, offset);
                  return buf.subarray(0, bytesRead);
                },
              }
            : {}),
        });
        process.stdout.write(flags.json ? `${JSON.stringify(report)}\n` : formatReport(report));
        process.exitCode = report.ok ? 0 : 1;
      } finally {
        await restored?.close();
        reader?.close();
      }
    });
}
