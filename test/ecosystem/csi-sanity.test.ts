/**
 * csi-sanity (kubernetes-csi/csi-test, the pinned version) against `cbt-csi serve` with every service,
 * node service included, once per volume access type. One test a mode: it fails on any failed spec, and
 * prints the passed/failed/pending/skipped counts from csi-sanity's own JSON report.
 * Needs root, /dev/fuse and loop devices (the Node specs stage and publish real loop devices), and
 * csi-sanity built by scripts/ecosystem/build.sh.
 */
import { spawn } from 'node:child_process';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { afterEach, expect, test } from 'vitest';
import { missingDataPlane, startNodeEnv, type NodeEnv } from '../e2e/support/node-env.js';
import { COMPONENTS, missingTools, suiteUnless, tool } from './tools.js';
import { makePeerCerts, missingOpenssl } from '../support/peer-certs.js';

const GiB = 2 ** 30;

/**
 * --csi.testvolumemutableparameters: what the ModifyVolume specs create volumes with and modify them to (a
 * VolumeAttributesClass's parameters). Keys with an effect: limits the volumes never reach in the specs,
 * and the metadata answers' style and profile.
 */
const MUTABLE_PARAMETERS = 'maxIops: "5000"\nmaxBandwidth: "256Mi"\nmetadataStyle: VARIABLE\nmetadataProfile: exact\n';

interface SpecReport {
  LeafNodeType: string;
  State: string;
  LeafNodeText: string;
  ContainerHierarchyTexts: string[] | null;
  Failure?: { Message: string };
}

/** Counts of the It specs of a ginkgo JSON report (suite setup nodes are not specs). */
function countSpecs(reportFile: string) {
  const suites = JSON.parse(fs.readFileSync(reportFile, 'utf8')) as { SpecReports: SpecReport[] | null }[];
  const specs = suites.flatMap((s) => s.SpecReports ?? []).filter((s) => s.LeafNodeType === 'It');
  const count = (state: string) => specs.filter((s) => s.State === state).length;
  const failures = specs
    .filter((s) => !['passed', 'skipped', 'pending'].includes(s.State))
    .map(
      (s) =>
        `${s.State}: ${[...(s.ContainerHierarchyTexts ?? []), s.LeafNodeText].join(' ')}: ${s.Failure?.Message ?? ''}`,
    );
  const skippedSpecs = specs
    .filter((s) => s.State === 'skipped')
    .map((s) => [...(s.ContainerHierarchyTexts ?? []), s.LeafNodeText].join(' '));
  return {
    skippedSpecs,
    passed: count('passed'),
    failed: specs.length - count('passed') - count('skipped') - count('pending'),
    pending: count('pending'),
    skipped: count('skipped'),
    failures,
  };
}

/** Runs csi-sanity to completion; resolves with its exit code and output. */
function runSanity(args: string[], logFile: string): Promise<{ code: number | null; output: string }> {
  return new Promise((resolve, reject) => {
    const child = spawn(tool('csi-sanity'), args, { stdio: ['ignore', 'pipe', 'pipe'] });
    let output = '';
    const log = fs.createWriteStream(logFile);
    for (const stream of [child.stdout!, child.stderr!]) {
      stream.on('data', (d: Buffer) => {
        output += d.toString();
        log.write(d);
      });
    }
    child.once('error', reject);
    child.once('exit', (code) => log.end(() => resolve({ code, output })));
  });
}

/** serve flags of multi-node mode with no other node: handles name this node, the peer listener runs. */
function multiNodeArgs(certDir: string): string[] {
  const certs = makePeerCerts(certDir).valid;
  return [
    ...['--node-id', 'sanity-node', '--peer-listen', '127.0.0.1:0', '--peers', ''],
    ...['--peer-tls-cert', certs.cert, '--peer-tls-key', certs.key, '--peer-tls-ca', certs.ca],
  ];
}

let env: NodeEnv | undefined;
let certDir: string | undefined;
afterEach(async () => {
  await env?.cleanup();
  env = undefined;
  if (certDir) fs.rmSync(certDir, { recursive: true, force: true });
  certDir = undefined;
});

suiteUnless(
  missingDataPlane() ?? missingTools(['csi-sanity']),
  `csi-sanity ${COMPONENTS['csi-sanity']!.version}`,
  () => {
    test.each([
      ['mount', false],
      ['block', false],
      ['block', true],
    ] as const)(
      '--csi.testvolumeaccesstype=%s (multi-node handles: %s): every spec passes or is skipped for a capability the driver does not advertise',
      async (mode, multiNode) => {
        // Multi-node mode (docs/adr/0008): every handle carries the node's ID, and the peer listener is up.
        const missing = multiNode ? missingOpenssl() : undefined;
        if (missing) throw new Error(missing);
        if (multiNode) certDir = fs.mkdtempSync(path.join(os.tmpdir(), 'cbt-sanity-certs-'));
        const peerArgs = certDir ? multiNodeArgs(certDir) : [];
        // A fresh driver and state directory per mode: csi-sanity reuses volume names within a run.
        env = await startNodeEnv(peerArgs);
        const report = env.path('sanity-report.json');
        const mutable = env.path('mutable-parameters.yaml');
        fs.writeFileSync(mutable, MUTABLE_PARAMETERS);
        const { code, output } = await runSanity(
          [
            `--csi.endpoint=${env.target.replace(/^unix:\/\//, '')}`,
            `--csi.testvolumeaccesstype=${mode}`,
            `--csi.testvolumesize=${GiB}`,
            `--csi.testvolumeexpandsize=${2 * GiB}`,
            `--csi.testvolumemutableparameters=${mutable}`,
            // csi-sanity creates these itself and they must not exist yet.
            `--csi.mountdir=${env.path('sanity-mnt')}`,
            `--csi.stagingdir=${env.path('sanity-stg')}`,
            `--ginkgo.json-report=${report}`,
            '--ginkgo.no-color',
            '--ginkgo.timeout=8m',
          ],
          env.path('csi-sanity.log'),
        );
        expect(fs.existsSync(report), `csi-sanity wrote no report (exit ${code}):\n${output.slice(-3000)}`).toBe(true);
        const counts = countSpecs(report);
        console.log(
          `csi-sanity ${mode}: ${counts.passed} passed, ${counts.failed} failed, ${counts.pending} pending, ${counts.skipped} skipped`,
        );
        console.log(`csi-sanity ${mode} skipped:\n  ${counts.skippedSpecs.join('\n  ')}`);
        expect(counts.failures, output.slice(-3000)).toEqual([]);
        expect(code, output.slice(-3000)).toBe(0);
        // Everything but ControllerPublish (9 specs, which a single-node local driver does not need) runs: more
        // than csi-driver-host-path v1.16.1's 73.
        expect(counts.passed).toBeGreaterThan(73);
        // The only skips are specs that need PUBLISH_UNPUBLISH_VOLUME ("volume lifecycle" publishes too).
        expect(
          counts.skippedSpecs.filter(
            (s) => !/ControllerPublishVolume|ControllerUnpublishVolume|volume lifecycle/.test(s),
          ),
        ).toEqual([]);
      },
      600_000,
    );
  },
);
