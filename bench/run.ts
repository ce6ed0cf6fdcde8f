/**
 * Benchmark runner: `npm run bench -- <suite> [<suite>...] [--quick] [--dir <path>] [--only <case,case>]`.
 *
 * A suite is a file bench/<suite>.ts exporting `run` (see bench/suite.ts); adding one needs no change here.
 * stdout carries result lines only, one JSON object a line; everything else goes to stderr.
 * Exit codes: 0 done, 1 a suite failed, 2 bad usage (unknown suite or option).
 */
import * as fs from 'node:fs';
import * as os from 'node:os';
import * as path from 'node:path';
import { fileURLToPath, pathToFileURL } from 'node:url';
import type { BenchResult, SuiteContext, SuiteRun } from './suite.js';

const BENCH_DIR = path.dirname(fileURLToPath(import.meta.url));
/** Files in bench/ that are infrastructure, not suites. */
const NOT_SUITES = new Set(['run', 'suite', 'plot']);
const SUITE_NAME = /^[a-z][a-z0-9-]*$/;

const USAGE = 'usage: npm run bench -- <suite> [<suite>...] [--quick] [--dir <path>] [--only <case,...>]';

class UsageError extends Error {}

interface Args {
  suites: string[];
  quick: boolean;
  dir: string | undefined;
  only: Set<string> | undefined;
}

function parseArgs(argv: readonly string[]): Args {
  const args: Args = { suites: [], quick: false, dir: undefined, only: undefined };
  for (let i = 0; i < argv.length; i++) {
    const arg = argv[i]!;
    const valueFor = (flag: string): string => {
      const eq = arg.indexOf('=');
      if (eq >= 0) return arg.slice(eq + 1);
      const next = argv[++i];
      if (next === undefined || next.startsWith('--')) throw new UsageError(`${flag} needs a value`);
      return next;
    };
    if (arg === '--quick') args.quick = true;
    else if (arg === '--dir' || arg.startsWith('--dir=')) args.dir = valueFor('--dir');
    else if (arg === '--only' || arg.startsWith('--only=')) {
      args.only = new Set(
        valueFor('--only')
          .split(',')
          .filter((s) => s !== ''),
      );
    } else if (arg === '--help' || arg === '-h') throw new UsageError('');
    else if (arg.startsWith('-')) throw new UsageError(`unknown option ${arg}`);
    else args.suites.push(arg);
  }
  if (args.suites.length === 0) throw new UsageError('no suite named');
  return args;
}

/** Suites present on disk: whatever bench/*.ts is not infrastructure. */
function availableSuites(): string[] {
  return fs
    .readdirSync(BENCH_DIR)
    .filter((f) => f.endsWith('.ts') && !f.endsWith('.d.ts'))
    .map((f) => f.slice(0, -3))
    .filter((name) => SUITE_NAME.test(name) && !NOT_SUITES.has(name))
    .sort();
}

/** Resolves every named suite before running any, so a typo fails fast instead of after a long run. */
async function loadSuites(names: readonly string[]): Promise<Map<string, SuiteRun>> {
  const known = availableSuites();
  const loaded = new Map<string, SuiteRun>();
  for (const name of names) {
    // The name becomes a file path, so only plain lower-case names of files actually present get through.
    if (!known.includes(name)) {
      throw new UsageError(`unknown suite "${name}" (available: ${known.join(', ') || 'none'})`);
    }
    const mod = (await import(pathToFileURL(path.join(BENCH_DIR, `${name}.ts`)).href)) as { run?: unknown };
    if (typeof mod.run !== 'function') throw new UsageError(`bench/${name}.ts does not export a run function`);
    loaded.set(name, mod.run as SuiteRun);
  }
  return loaded;
}

async function main(): Promise<number> {
  let args: Args;
  let suites: Map<string, SuiteRun>;
  try {
    args = parseArgs(process.argv.slice(2));
    // Some native modules parse the host's argv when they load: roaring's loader (node-pre-gyp) reads
    // `--dir X` as its own `--directory` and then fails to find its binary. Suites get their options from
    // the context, so hide ours before any suite is imported.
    process.argv.splice(2);
    suites = await loadSuites(args.suites);
  } catch (err) {
    if (err instanceof UsageError) {
      if (err.message !== '') process.stderr.write(`bench: ${err.message}\n`);
      process.stderr.write(`${USAGE}\n`);
      return 2;
    }
    throw err;
  }

  // Anything a suite or a library prints with console.log would corrupt the JSON-lines stream: route the
  // process's stdout to stderr and keep the real stdout for results only.
  const writeResult = process.stdout.write.bind(process.stdout);
  process.stdout.write = process.stderr.write.bind(process.stderr) as typeof process.stdout.write;

  const parent = args.dir ?? os.tmpdir();
  fs.mkdirSync(parent, { recursive: true });
  // Always a fresh directory of our own, even under --dir, so that cleanup never deletes the caller's files.
  const root = fs.mkdtempSync(path.join(parent, 'cbt-bench-'));
  const cleanup = (): void => fs.rmSync(root, { recursive: true, force: true });
  // On a signal, cleanup runs from the exit handler, after any exit handlers suites prepend (e.g. to stop children).
  process.once('exit', cleanup);
  const onSignal = (signal: NodeJS.Signals): void => {
    process.stderr.write(`bench: interrupted by ${signal}, removing ${root}\n`);
    process.exit(130);
  };
  process.once('SIGINT', onSignal);
  process.once('SIGTERM', onSignal);

  let failed = false;
  try {
    for (const [name, run] of suites) {
      const dir = path.join(root, name);
      fs.mkdirSync(dir);
      const log = (message: string): void => {
        process.stderr.write(`[${name}] ${message}\n`);
      };
      const ctx: SuiteContext = {
        dir,
        quick: args.quick,
        only: args.only,
        emit: (result) => {
          // The 1-minute load average travels with every figure: on a shared 2-core machine it says how far
          // other work may have skewed it.
          const params = { ...result.params, hostLoad1: Math.round(os.loadavg()[0]! * 100) / 100 };
          const line: BenchResult = { suite: name, ...result, params };
          writeResult(`${JSON.stringify(line)}\n`);
        },
        log,
      };
      log(`start${args.quick ? ' (quick)' : ''} in ${dir}`);
      const started = performance.now();
      try {
        await run(ctx);
        log(`done in ${((performance.now() - started) / 1000).toFixed(1)} s`);
      } catch (err) {
        failed = true;
        log(`FAILED: ${err instanceof Error ? (err.stack ?? err.message) : String(err)}`);
      }
      fs.rmSync(dir, { recursive: true, force: true });
    }
  } finally {
    cleanup();
    process.off('SIGINT', onSignal);
    process.off('SIGTERM', onSignal);
  }
  return failed ? 1 : 0;
}

// Exit explicitly: a suite that leaks a timer or handle must not keep a finished run hanging. stdout and stderr
// are pipes or files here, which Node writes synchronously on Linux, so nothing printed is lost.
main().then(
  (code) => process.exit(code),
  (err: unknown) => {
    process.stderr.write(`bench: ${err instanceof Error ? (err.stack ?? err.message) : String(err)}\n`);
    process.exit(1);
  },
);
