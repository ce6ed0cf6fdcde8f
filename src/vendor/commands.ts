/**
 * The vendor bench commands: `cbt-csi faults add|list|clear` (the running driver's fault rules, over its
 * admin endpoint), `cbt-csi generate` and `cbt-csi check` (known answers). cli.ts registers them with one call.
 */
import fs from 'node:fs';
import { type Command, InvalidArgumentError, Option } from 'commander';
import { parse as parseYaml } from 'yaml';
import { adminRequest, type ActiveFault } from './admin-endpoint.js';
import { registerKnownAnswerCommands } from './known-answer-commands.js';
import {
  FAULT_ACTIONS,
  FAULT_RPCS,
  FaultRuleError,
  parseFaultRule,
  parseFaultRules,
  type FaultRule,
} from './fault-rules.js';

/** Reads a rules file (YAML or JSON) for `serve --faults`; errors name the file and the field. */
export function loadFaultFile(file: string): FaultRule[] {
  let text: string;
  try {
    text = fs.readFileSync(file, 'utf8');
  } catch (err) {
    throw new Error(`--faults ${file}: ${(err as Error).message}`);
  }
  try {
    return parseFaultRules(parseYaml(text));
  } catch (err) {
    if (err instanceof FaultRuleError || err instanceof Error) throw new Error(`--faults ${file}: ${err.message}`);
    throw err;
  }
}

const ENDPOINT_HELP = "the driver's admin socket (its serve --admin-endpoint; env CBT_CSI_ADMIN_ENDPOINT)";

function integerArg(value: string): number {
  const n = Number(value);
  if (value.trim() === '' || !Number.isSafeInteger(n)) throw new InvalidArgumentError('expected an integer');
  return n;
}

function numberArg(value: string): number {
  const n = Number(value);
  if (value.trim() === '' || !Number.isFinite(n)) throw new InvalidArgumentError('expected a number');
  return n;
}

function endpointOf(opts: { adminEndpoint?: string }): string {
  const endpoint = opts.adminEndpoint ?? process.env.CBT_CSI_ADMIN_ENDPOINT;
  if (!endpoint)
    throw new Error('no admin endpoint: pass --admin-endpoint PATH (the driver must run with serve --admin-endpoint)');
  return endpoint;
}

function describe(rule: ActiveFault): string {
  const keys: (keyof FaultRule)[] = [
    'volume',
    'snapshot',
    'code',
    'message',
    'afterMessages',
    'delayMs',
    'stallMs',
    'deadlineMs',
    'probability',
    'seed',
  ];
  const extra = keys.filter((k) => rule[k] !== undefined).map((k) => `${k}=${JSON.stringify(rule[k])}`);
  const uses = rule.times === undefined ? 'forever' : `${rule.times - rule.matched} of ${rule.times} left`;
  return `${rule.id}\t${rule.rpc}\t${rule.action}\t${uses}\tmatched=${rule.matched} fired=${rule.fired}\t${extra.join(' ')}`;
}

interface AddFlags {
  adminEndpoint?: string;
  file?: string;
  rpc?: string;
  action?: string;
  volume?: string;
  snapshot?: string;
  times?: number;
  code?: string;
  message?: string;
  afterMessages?: number;
  delayMs?: number;
  stallMs?: number;
  deadlineMs?: number;
  probability?: number;
  seed?: number;
}

export function registerVendorCommands(program: Command): void {
  const faults = program
    .command('faults')
    .description('fault rules of a running driver (vendor bench), over its admin endpoint');
  faults
    .command('add')
    .description('add fault rules: from a YAML/JSON file, or one rule from flags')
    .option('--admin-endpoint <path>', ENDPOINT_HELP)
    .option('--file <file>', 'YAML or JSON: a list of rules, or faults: [...]')
    .addOption(new Option('--rpc <rpc>', 'which RPC').choices(FAULT_RPCS as unknown as string[]))
    .addOption(new Option('--action <action>', 'what happens').choices(FAULT_ACTIONS as unknown as string[]))
    .option('--volume <id>', 'only calls about this volume')
    .option('--snapshot <id>', 'only calls about this snapshot (CreateSnapshot: its name)')
    .option('--times <k>', 'only the first K matching calls (default: every one)', integerArg)
    .option('--code <code>', 'gRPC code name for fail, fail-after, flaky (default UNAVAILABLE)')
    .option('--message <text>', 'status message')
    .option('--after-messages <n>', 'fail-after: messages before the failure; stall: before the stall', integerArg)
    .option('--delay-ms <ms>', 'delay: before each message', integerArg)
    .option('--stall-ms <ms>', 'stall: length of the one pause', integerArg)
    .option(
      '--deadline-ms <ms>',
      'deadline: end the stream with DEADLINE_EXCEEDED this long after it started',
      integerArg,
    )
    .option('--probability <p>', 'flaky: chance a matching call fails, 0 to 1', numberArg)
    .option('--seed <n>', 'flaky: seed of the reproducible sequence', integerArg)
    .action(async (flags: AddFlags) => {
      const endpoint = endpointOf(flags);
      let rules: FaultRule[];
      if (flags.file) {
        if (flags.rpc || flags.action) throw new Error('give either --file or --rpc/--action, not both');
        rules = loadFaultFile(flags.file);
      } else {
        const { adminEndpoint: _endpoint, file: _file, ...rule } = flags;
        rules = [parseFaultRule(rule, 'rule')];
      }
      const res = (await adminRequest(endpoint, 'POST', '/faults', rules)) as { added: ActiveFault[] };
      for (const rule of res.added) process.stdout.write(`added ${describe(rule)}\n`);
    });
  faults
    .command('list')
    .description('the rules in force')
    .option('--admin-endpoint <path>', ENDPOINT_HELP)
    .option('--json', 'machine-readable output')
    .action(async (flags: { adminEndpoint?: string; json?: boolean }) => {
      const res = (await adminRequest(endpointOf(flags), 'GET', '/faults')) as { faults: ActiveFault[] };
      if (flags.json) process.stdout.write(`${JSON.stringify(res.faults)}\n`);
      else if (res.faults.length === 0) process.stdout.write('no fault rules\n');
      else for (const rule of res.faults) process.stdout.write(`${describe(rule)}\n`);
    });
  faults
    .command('clear')
    .description('remove every rule, or the one with the given id')
    .argument('[id]', 'rule id (from faults list)', integerArg)
    .option('--admin-endpoint <path>', ENDPOINT_HELP)
    .action(async (id: number | undefined, flags: { adminEndpoint?: string }) => {
      const res = (await adminRequest(endpointOf(flags), 'DELETE', id === undefined ? '/faults' : `/faults/${id}`)) as {
        removed: number;
      };
      process.stdout.write(`removed ${res.removed} rule${res.removed === 1 ? '' : 's'}\n`);
    });
  registerKnownAnswerCommands(program);
}
