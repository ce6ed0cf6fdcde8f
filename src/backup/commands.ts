/**
 * The backup toolkit's commands, registered beside `serve`: metadata, backup, restore, verify, blockmap,
 * demo. Exit codes: 0 done, 1 failed (a damaged repository, a driver error), 2 bad input (one line saying
 * what was wrong; nothing written to the repository), 130 interrupted (Ctrl-C, after cleaning up).
 */
import path from 'node:path';
import { type Command, InvalidArgumentError, Option } from 'commander';
import {
  connectCsiDirect,
  connectKubernetes,
  EndpointError,
  InvalidArgumentError as MetadataInvalidArgument,
  NotFoundError,
  OutOfRangeError,
  type Extent,
  type ExtentListing,
  type ResumeListener,
  type SnapshotMetadataClient,
} from '../client/index.js';
import { isPowerOfTwo } from '../client/metadata-client.js';
import { UsageError, kubeconfigOption, namespaceOption, oneMode } from '../cli-modes.js';
import { openSource, type BlockSource } from './block-target.js';
import { renderBlockmap, type BlockmapRow } from './blockmap.js';
import { planBackup, writeBackup, type SnapshotLister } from './backup-run.js';
import { CsiVolumes, type ExposedSnapshot } from './csi-volumes.js';
import { driverStateAround } from './driver-state.js';
import { runDemo } from './demo.js';
import { writeFileDurably } from './durable-files.js';
import { createProgress } from './progress.js';
import { BackupRepository, RepositoryError, type RepositoryLock } from './repository.js';
import { restoreBackup } from './restore.js';
import { stdoutReaderGone, watchStdoutReader } from './stdout-reader.js';
import { counted, formatBytes } from './units.js';

/** The driver's socket: --endpoint, else $CSI_ENDPOINT, else where `cbt-csi serve` listens by default. */
function defaultEndpoint(): string {
  return process.env.CSI_ENDPOINT ?? `unix://${path.resolve('.state/csi.sock')}`;
}

/** Runs a command body with the toolkit's error handling and exit codes, and Ctrl-C as an abort. */
function action<A extends unknown[]>(
  name: string,
  body: (signal: AbortSignal, ...args: A) => Promise<number | undefined> | Promise<void>,
  /** What an interrupted run leaves behind, for its last line. */
  leftBehind = 'nothing was committed',
): (...args: A) => Promise<void> {
  return async (...args: A) => {
    // Output piped into `head` and the like: a reader that goes away ends the command quietly.
    watchStdoutReader();
    const controller = new AbortController();
    let interrupts = 0;
    const onSignal = () => {
      if (++interrupts > 1) process.exit(130);
      process.stderr.write(`cbt-csi ${name}: interrupted, cleaning up (Ctrl-C again to quit at once)\n`);
      controller.abort(new Error('interrupted'));
    };
    process.on('SIGINT', onSignal);
    process.on('SIGTERM', onSignal);
    let code: number;
    try {
      code = (await body(controller.signal, ...args)) ?? 0;
    } catch (err) {
      code = controller.signal.aborted ? 130 : exitCodeOf(err);
      const message = controller.signal.aborted
        ? `interrupted; ${leftBehind}`
        : err instanceof Error
          ? err.message
          : String(err);
      process.stderr.write(`cbt-csi ${name}: ${message}\n`);
    } finally {
      process.off('SIGINT', onSignal);
      process.off('SIGTERM', onSignal);
    }
    process.exitCode = code;
  };
}

function exitCodeOf(err: unknown): number {
  if (err instanceof UsageError || err instanceof EndpointError) return 2;
  if (err instanceof RepositoryError) return err.kind === 'usage' ? 2 : 1;
  if (err instanceof NotFoundError || err instanceof MetadataInvalidArgument || err instanceof OutOfRangeError)
    return 2;
  return 1;
}

function nonNegativeInteger(value: string): number {
  const n = Number(value);
  // Number('') is 0: an empty value (an unset shell variable) must not pass as offset 0.
  if (value.trim() === '' || !Number.isSafeInteger(n) || n < 0)
    throw new InvalidArgumentError('expected an integer, 0 or more');
  return n;
}

function powerOfTwo(value: string): number {
  const n = Number(value);
  if (!isPowerOfTwo(n)) throw new InvalidArgumentError('expected a power of two, e.g. 4096');
  return n;
}

/** Bad flags and missing options are bad input too: exit code 2 (help and --version stay 0). */
function usageExits(cmd: Command): Command {
  return cmd.exitOverride((err) => process.exit(err.exitCode === 0 ? 0 : 2));
}

function endpointOption(): Option {
  return new Option(
    '--endpoint <endpoint>',
    "the driver's socket: unix:///path/csi.sock or tcp://HOST:PORT (default $CSI_ENDPOINT, else ./.state/csi.sock)",
  );
}

interface MetadataFlags {
  endpoint?: string;
  namespace?: string;
  kubeconfig?: string;
  json?: boolean;
  format: 'table' | 'csv' | 'json';
  startingOffset: number;
  maxResults: number;
  blockSize?: number;
}

/** Registers the toolkit's commands on the `cbt-csi` program. */
export function registerBackupCommands(program: Command): void {
  const metadata = usageExits(
    program.command('metadata').description('list the allocated or changed extents of snapshots (SnapshotMetadata)'),
  );
  const listingOptions = (cmd: Command) =>
    usageExits(
      cmd
        .addOption(endpointOption())
        .addOption(namespaceOption())
        .addOption(kubeconfigOption())
        .addOption(new Option('--format <format>', 'output').choices(['table', 'csv', 'json']).default('table'))
        .option('--json', 'same as --format json')
        .option('--starting-offset <bytes>', 'start at this byte offset', nonNegativeInteger, 0)
        .option('--max-results <n>', 'tuples per message to ask the driver for (0: it decides)', nonNegativeInteger, 0)
        .option('--block-size <bytes>', 're-chunk the answer into aligned blocks of this size', powerOfTwo),
    );
  listingOptions(metadata.command('allocated <snapshot>').description('extents holding data in a snapshot')).action(
    action('metadata allocated', async (signal, snapshot: string, flags: MetadataFlags) => {
      await printListing(flags, signal, (c) => c.allocated(snapshot, listOptions(flags, signal)));
    }),
  );
  listingOptions(
    metadata.command('delta <base> <target>').description('extents changed between two snapshots of a volume'),
  ).action(
    action('metadata delta', async (signal, base: string, target: string, flags: MetadataFlags) => {
      await printListing(flags, signal, (c) => c.delta(base, target, listOptions(flags, signal)));
    }),
  );

  usageExits(
    program
      .command('backup')
      .description('back up a snapshot into a repository: full, or incremental on --base (reads only what changed)')
      .requiredOption('--repo <dir>', 'the repository (created if absent or empty)')
      .requiredOption('--snapshot <id>', 'the CSI snapshot to back up (with --namespace: the VolumeSnapshot)')
      .option('--base <backup-id>', "the backup to build on (its snapshot is the delta's base); default: a full backup")
      .option(
        '--source <device-or-file>',
        "read the snapshot's bytes from here (a device or image of it); default: publish a copy of it through the Node service (root); required with --namespace",
      )
      .addOption(endpointOption())
      .addOption(namespaceOption())
      .addOption(kubeconfigOption())
      .option('--json', 'print the summary as JSON')
      .option('--quiet', 'no progress output'),
  ).action(action('backup', backupCommand));

  usageExits(
    program
      .command('restore')
      .description('restore a backup (the volume its full backup and incrementals make) onto a device or file')
      .requiredOption('--repo <dir>', 'the repository')
      .requiredOption('--backup <id>', 'the backup to restore')
      .requiredOption(
        '--target <device-or-file>',
        "where to: an absent path becomes an image file; a device or file must be at least the volume's size",
      )
      .option('--json', 'print the summary as JSON')
      .option('--quiet', 'no progress output'),
  ).action(action('restore', restoreCommand, 'the target holds part of the backup: restore it again before use'));

  usageExits(
    program
      .command('verify')
      .description("re-read every chunk of a repository (or of one backup's chain) and check its SHA-256")
      .requiredOption('--repo <dir>', 'the repository')
      .option('--backup <id>', 'only what restoring this backup needs')
      .option('--json', 'print the report as JSON')
      .option('--quiet', 'no progress output'),
  ).action(action('verify', verifyCommand, 'the check did not finish'));

  usageExits(
    program
      .command('blockmap')
      .description('draw where data sits or changed on a volume as an SVG: one row per snapshot or backup')
      .option(
        '--snapshot <id...>',
        'snapshots of one volume, oldest first: a row each (the first: allocated, or changed since --base; the rest: changed since the one before)',
      )
      .option('--base <id>', 'snapshot the first row is compared with')
      .option('--repo <dir>', "draw a repository's backups instead (what each stored)")
      .option('--backup <id>', "with --repo: only this backup's chain")
      .requiredOption('--out <file.svg>', 'where to write the picture')
      .addOption(endpointOption()),
  ).action(action('blockmap', blockmapCommand));

  usageExits(
    program
      .command('demo')
      .description(
        'five minutes with changed block tracking: write, snapshot, list the delta, draw it, back up and restore (needs root)',
      )
      .addOption(endpointOption())
      .option('--out <file.svg>', 'where to write the block map', 'cbt-demo-blockmap.svg'),
  ).action(
    action('demo', async (signal, flags: { endpoint?: string; out: string }) => {
      await runDemo({
        endpoint: flags.endpoint ?? defaultEndpoint(),
        out: path.resolve(flags.out),
        signal,
        print: (line) => process.stdout.write(`${line}\n`),
      });
    }),
  );
}

function listOptions(flags: MetadataFlags, signal: AbortSignal) {
  return { startingOffset: flags.startingOffset, maxResults: flags.maxResults, blockSize: flags.blockSize, signal };
}

async function printListing(
  flags: MetadataFlags,
  signal: AbortSignal,
  open: (client: SnapshotMetadataClient) => Promise<ExtentListing>,
): Promise<void> {
  oneMode(flags);
  const client = flags.namespace
    ? connectKubernetes({ namespace: flags.namespace, kubeconfig: flags.kubeconfig })
    : connectCsiDirect(flags.endpoint ?? defaultEndpoint());
  try {
    signal.throwIfAborted();
    const listing = await open(client);
    const format = flags.json ? 'json' : flags.format;
    const out = process.stdout;
    if (format === 'json') {
      const extents: Extent[] = [];
      for await (const e of listing) extents.push(e);
      out.write(
        `${JSON.stringify({ capacityBytes: listing.capacityBytes, blockMetadataType: listing.blockMetadataType, extents })}\n`,
      );
      return;
    }
    if (format === 'csv') out.write('offset,length\n');
    else
      out.write(
        `capacity ${listing.capacityBytes} bytes (${formatBytes(listing.capacityBytes)}), ${listing.blockMetadataType}\n${'OFFSET'.padStart(16)} ${'LENGTH'.padStart(12)}  END\n`,
      );
    let count = 0;
    let bytes = 0;
    for await (const e of listing) {
      // The reader is gone (`| head`): stop reading the driver too; leaving the loop ends the stream.
      if (stdoutReaderGone()) return;
      count++;
      bytes += e.length;
      out.write(
        format === 'csv'
          ? `${e.offset},${e.length}\n`
          : `${String(e.offset).padStart(16)} ${String(e.length).padStart(12)}  ${e.offset + e.length}\n`,
      );
    }
    if (format === 'table') out.write(`${count} extents, ${bytes} bytes (${formatBytes(bytes)})\n`);
  } finally {
    await client.close();
  }
}

interface BackupFlags {
  repo: string;
  snapshot: string;
  base?: string;
  source?: string;
  endpoint?: string;
  namespace?: string;
  kubeconfig?: string;
  json?: boolean;
  quiet?: boolean;
}

/** The snapshot a backup is taken of: its CSI ID (what the manifest keeps) and volume, when known. */
interface BackupSubject {
  id: string;
  sourceVolume: string | null;
}

async function backupCommand(signal: AbortSignal, flags: BackupFlags): Promise<void> {
  oneMode(flags);
  // Everything is checked before the repository is created or written.
  const driverState = await driverStateAround(flags.repo);
  if (driverState)
    throw new UsageError(
      `repository ${flags.repo} is inside the cbt-csi driver's state directory ${driverState}: put it elsewhere`,
    );
  const state = await BackupRepository.check(path.resolve(flags.repo));
  const onResume: ResumeListener = ({ offset, attempt, delayMs }) => {
    if (!flags.quiet)
      process.stderr.write(`metadata stream cut; resuming at byte ${offset} in ${delayMs} ms (attempt ${attempt})\n`);
  };
  if (flags.namespace) {
    const source = flags.source;
    if (!source)
      throw new UsageError(
        'in Kubernetes mode (--namespace) --source is required: the block device of a PVC restored from the VolumeSnapshot and attached to this pod',
      );
    const client = connectKubernetes({ namespace: flags.namespace, kubeconfig: flags.kubeconfig, onResume });
    try {
      const snapshot = await client.snapshot(flags.snapshot);
      // The manifest keeps the CSI handle: the sidecar takes a delta's base as one, and it outlives the
      // base VolumeSnapshot object.
      const lister: SnapshotLister = {
        allocated: (_id, options) => client.allocated(snapshot.name, options),
        delta: (baseId, _id, options) => client.deltaFromHandle(baseId, snapshot.name, options),
      };
      await runBackup(
        signal,
        flags,
        state,
        { id: snapshot.snapshotHandle, sourceVolume: snapshot.sourceVolumeHandle },
        lister,
        (capacity) => openSource(source, capacity),
      );
    } finally {
      await client.close();
    }
    return;
  }

  const endpoint = flags.endpoint ?? defaultEndpoint();
  const volumes = new CsiVolumes(endpoint);
  const client = connectCsiDirect(endpoint, { onResume });
  let exposed: ExposedSnapshot | undefined;
  try {
    const snapshot = await volumes.snapshot(flags.snapshot);
    await runBackup(signal, flags, state, snapshot, client, async (capacity) => {
      if (flags.source) return openSource(flags.source, capacity);
      exposed = await volumes.expose(snapshot, signal);
      return openSource(exposed.device, capacity);
    });
  } finally {
    const released = exposed?.release();
    await client.close();
    if (released) await released.finally(() => volumes.close());
    else volumes.close();
  }
}

/** Plans, reads and commits one backup of `snapshot`, reading from what `openSourceFor` opens. */
async function runBackup(
  signal: AbortSignal,
  flags: BackupFlags,
  state: Awaited<ReturnType<typeof BackupRepository.check>>,
  snapshot: BackupSubject,
  lister: SnapshotLister,
  openSourceFor: (capacityBytes: number) => Promise<BlockSource>,
): Promise<void> {
  let lock: RepositoryLock | undefined;
  let source: BlockSource | undefined;
  try {
    let base = null;
    if (flags.base) {
      if (state !== 'repository')
        throw new UsageError(
          `base backup ${flags.base} cannot be in ${flags.repo}: it is not a repository yet (omit --base for a full backup)`,
        );
      const repo = await BackupRepository.open(flags.repo);
      // The whole chain, not only the base: an incremental on a base that cannot be restored cannot be either.
      await repo.manifest(flags.base);
      const chain = await repo.chain(flags.base).catch((err: unknown) => {
        if (!(err instanceof RepositoryError)) throw err;
        throw new RepositoryError(
          'damaged',
          `cannot build on backup ${flags.base}: ${err.message}; take a full backup (omit --base), or run \`cbt-csi verify --repo ${flags.repo}\``,
        );
      });
      base = chain.at(-1)!;
      if (base.sourceVolume && snapshot.sourceVolume && base.sourceVolume !== snapshot.sourceVolume) {
        throw new UsageError(
          `base backup ${base.id} is of volume ${base.sourceVolume}, but snapshot ${snapshot.id} is of volume ${snapshot.sourceVolume}: an incremental backup needs a base of the same volume`,
        );
      }
    }
    const plan = await planBackup(lister, snapshot.id, snapshot.sourceVolume, base, signal).catch((err: unknown) => {
      if (base && err instanceof NotFoundError) {
        throw new UsageError(
          `the base backup's snapshot ${base.snapshot} is gone from the driver, so nothing can say what changed since: take a full backup (omit --base)`,
        );
      }
      throw err;
    });
    source = await openSourceFor(plan.capacityBytes);
    signal.throwIfAborted();
    const repo = await BackupRepository.openOrCreate(flags.repo);
    lock = await repo.lock();
    const summary = await writeBackup(repo, lock, plan, source, createProgress(flags.quiet ? 'quiet' : 'auto'), signal);
    if (flags.json) process.stdout.write(`${JSON.stringify(summary)}\n`);
    else {
      process.stdout.write(
        `backup ${summary.id}: ${summary.kind} of snapshot ${summary.snapshot}${summary.base ? ` on ${summary.base}` : ''}, ` +
          `${formatBytes(summary.bytesRead)} read in ${counted(summary.extents, 'extent')}, ${counted(summary.chunks, 'chunk')}, ${formatBytes(summary.newBytes)} new, ${summary.seconds.toFixed(1)} s\n`,
      );
    }
  } finally {
    await source?.close().catch(() => undefined);
    await lock?.release().catch(() => undefined);
  }
}

async function restoreCommand(
  signal: AbortSignal,
  flags: { repo: string; backup: string; target: string; json?: boolean; quiet?: boolean },
): Promise<void> {
  const repo = await BackupRepository.open(flags.repo);
  const summary = await restoreBackup(
    repo,
    flags.backup,
    path.resolve(flags.target),
    createProgress(flags.quiet ? 'quiet' : 'auto'),
    signal,
  );
  if (flags.json) process.stdout.write(`${JSON.stringify(summary)}\n`);
  else {
    process.stdout.write(
      `restored backup ${summary.backup} (${summary.chain.length} in its chain) onto ${summary.target}: ${formatBytes(summary.capacityBytes)} volume, ${formatBytes(summary.bytesWritten)} written, ${summary.seconds.toFixed(1)} s\n`,
    );
  }
}

async function verifyCommand(
  signal: AbortSignal,
  flags: { repo: string; backup?: string; json?: boolean; quiet?: boolean },
): Promise<number> {
  const repo = await BackupRepository.open(flags.repo);
  if (flags.backup) await repo.manifest(flags.backup);
  const progress = createProgress(flags.quiet ? 'quiet' : 'auto');
  const report = await repo
    .verify(
      flags.backup ? [flags.backup] : undefined,
      { total: (bytes) => progress.start('verify', bytes), add: (bytes) => progress.add(bytes) },
      signal,
    )
    .finally(() => progress.stop());
  const ok = report.damaged.length === 0 && report.damagedManifests.length === 0;
  if (flags.json) process.stdout.write(`${JSON.stringify({ ok, ...report })}\n`);
  else {
    for (const d of report.damagedManifests) process.stdout.write(`damaged: ${d.problem}\n`);
    for (const d of report.damaged)
      process.stdout.write(`damaged chunk ${d.chunk} (${d.problem}); it breaks backups: ${d.breaks.join(', ')}\n`);
    process.stdout.write(
      `${ok ? 'ok' : 'DAMAGED'}: ${counted(report.backups.length, 'backup')}, ${counted(report.chunksChecked, 'chunk')} (${formatBytes(report.bytesChecked)}) checked, ` +
        `${counted(report.damaged.length, 'damaged chunk')}, ${counted(report.damagedManifests.length, 'damaged manifest')}\n`,
    );
  }
  return ok ? 0 : 1;
}

async function blockmapCommand(
  signal: AbortSignal,
  flags: { snapshot?: string[]; base?: string; repo?: string; backup?: string; out: string; endpoint?: string },
): Promise<void> {
  if (!!flags.repo === !!flags.snapshot)
    throw new UsageError("give either --snapshot IDs (a driver's snapshots) or --repo DIR (a repository's backups)");
  const rows: BlockmapRow[] = [];
  let title: string;
  if (flags.repo) {
    const repo = await BackupRepository.open(flags.repo);
    const manifests = flags.backup
      ? await repo.chain(flags.backup)
      : await Promise.all((await repo.backupIds()).map((id) => repo.manifest(id)));
    if (manifests.length === 0) throw new UsageError(`${flags.repo} holds no backups yet`);
    for (const m of manifests) {
      rows.push({
        label: m.id,
        note: m.base ? 'changed since base' : 'full backup',
        capacityBytes: m.capacityBytes,
        extents: m.extents.map(([offset, length]) => ({ offset, length })),
      });
    }
    title = `Backups in ${path.basename(path.resolve(flags.repo))}`;
  } else {
    const client = connectCsiDirect(flags.endpoint ?? defaultEndpoint());
    try {
      const ids = flags.snapshot!;
      for (let i = 0; i < ids.length; i++) {
        const base = i === 0 ? flags.base : ids[i - 1];
        const listing = base
          ? await client.delta(base, ids[i]!, { signal })
          : await client.allocated(ids[i]!, { signal });
        const extents: Extent[] = [];
        for await (const e of listing) extents.push(e);
        rows.push({
          label: ids[i]!,
          note: base ? 'changed since the row above' : 'allocated',
          capacityBytes: listing.capacityBytes,
          extents,
        });
      }
    } finally {
      await client.close();
    }
    title = 'Changed blocks between snapshots';
  }
  const svg = renderBlockmap(rows, title);
  // Through a temp file renamed into place: a symlink planted at --out (in /tmp, say) is replaced, not
  // followed to whatever it points at. Readable by others, as a picture made to be shared.
  await writeFileDurably(path.resolve(flags.out), svg, undefined, 0o644).catch((err: NodeJS.ErrnoException) => {
    // A directory, a missing one, a read-only place: the caller's to fix.
    if (['EISDIR', 'ENOENT', 'ENOTDIR', 'EACCES', 'EPERM', 'EROFS'].includes(err.code ?? ''))
      throw new UsageError(`cannot write the block map to ${flags.out}: ${err.message}`);
    throw err;
  });
  process.stdout.write(`wrote ${flags.out}: ${rows.length} rows\n`);
}
