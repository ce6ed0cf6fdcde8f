/**
 * CSI Identity service (spec v1.12.0, "Identity Service RPC"), checked over the driver's unix socket
 * with an independent gRPC client. Expected values come from the spec's rules, package.json and the
 * capability set DESIGN.md documents.
 */
import fs from 'node:fs';
import path from 'node:path';
import { afterAll, beforeAll, describe, expect, test } from 'vitest';
import { status } from '@grpc/grpc-js';
import {
  GroupController,
  ControllerServiceCapability_RPC_Type,
  PluginCapability_Service_Type,
  PluginCapability_VolumeExpansion_Type,
  type PluginCapability,
} from '../../src/gen/csi/v1/csi_pb.js';
import { codeOf, ServiceClient } from '../support/csi-client.js';
import { REPO_ROOT, startTestDriver, type TestDriver } from '../support/test-driver.js';

/** package.json read directly, so the expectation does not share code with the driver. */
const pkg = JSON.parse(fs.readFileSync(path.join(REPO_ROOT, 'package.json'), 'utf8')) as { version: string };

/** The documented capability set (DESIGN.md, "CSI surface"), as comparable strings. */
const DOCUMENTED_CAPABILITIES = [
  `service:${PluginCapability_Service_Type.CONTROLLER_SERVICE}`,
  `service:${PluginCapability_Service_Type.VOLUME_ACCESSIBILITY_CONSTRAINTS}`,
  `service:${PluginCapability_Service_Type.SNAPSHOT_METADATA_SERVICE}`,
  `service:${PluginCapability_Service_Type.GROUP_CONTROLLER_SERVICE}`,
  `volumeExpansion:${PluginCapability_VolumeExpansion_Type.ONLINE}`,
].sort();

function describeCapability(c: PluginCapability): string {
  if (c.type.case === 'service') return `service:${c.type.value.type}`;
  if (c.type.case === 'volumeExpansion') return `volumeExpansion:${c.type.value.type}`;
  return `unset:${String(c.type.case)}`;
}

let d: TestDriver;
beforeAll(async () => {
  d = await startTestDriver();
});
afterAll(async () => {
  await d?.stop();
});

describe('GetPluginInfo', () => {
  test('GetPluginInfo: name is cbt.csi.dev', async () => {
    const info = await d.identity.call('getPluginInfo', {});
    expect(info.name).toBe('cbt.csi.dev');
  });

  test('GetPluginInfo: name is at most 63 characters, begins and ends alphanumeric, with only dashes, dots and alphanumerics between', async () => {
    const { name } = await d.identity.call('getPluginInfo', {});
    expect(name.length).toBeGreaterThan(0);
    expect(name.length).toBeLessThanOrEqual(63);
    expect(name).toMatch(/^[a-zA-Z0-9]([a-zA-Z0-9.-]*[a-zA-Z0-9])?$/);
  });

  test('GetPluginInfo: name follows domain name notation (RFC 1035 2.3.1: labels start with a letter, end alphanumeric, hyphens inside)', async () => {
    const { name } = await d.identity.call('getPluginInfo', {});
    const labels = name.split('.');
    expect(labels.length).toBeGreaterThan(1);
    for (const label of labels) {
      expect(label.length).toBeLessThanOrEqual(63);
      expect(label).toMatch(/^[a-zA-Z]([a-zA-Z0-9-]*[a-zA-Z0-9])?$/);
    }
  });

  test('GetPluginInfo: vendor_version is present and equals the version in package.json', async () => {
    const info = await d.identity.call('getPluginInfo', {});
    expect(pkg.version.length).toBeGreaterThan(0);
    expect(info.vendorVersion).toBe(pkg.version);
  });

  test('GetPluginInfo: repeated calls return the same identity', async () => {
    const a = await d.identity.call('getPluginInfo', {});
    const b = await d.identity.call('getPluginInfo', {});
    expect({ name: b.name, vendorVersion: b.vendorVersion, manifest: b.manifest }).toEqual({
      name: a.name,
      vendorVersion: a.vendorVersion,
      manifest: a.manifest,
    });
  });
});

describe('GetPluginCapabilities', () => {
  test('GetPluginCapabilities: returns exactly the documented set (CONTROLLER_SERVICE, VOLUME_ACCESSIBILITY_CONSTRAINTS, SNAPSHOT_METADATA_SERVICE, GROUP_CONTROLLER_SERVICE, ONLINE expansion), each once', async () => {
    const { capabilities } = await d.identity.call('getPluginCapabilities', {});
    expect(capabilities.map(describeCapability).sort()).toEqual(DOCUMENTED_CAPABILITIES);
  });

  test('GetPluginCapabilities: GROUP_CONTROLLER_SERVICE is claimed only with the GroupController service served', async () => {
    const { capabilities } = await d.identity.call('getPluginCapabilities', {});
    expect(capabilities.map(describeCapability)).toContain(
      `service:${PluginCapability_Service_Type.GROUP_CONTROLLER_SERVICE}`,
    );
    const group = new ServiceClient(GroupController, d.target);
    try {
      const caps = await group.call('groupControllerGetCapabilities', {});
      expect(caps.capabilities.length).toBeGreaterThan(0);
    } finally {
      group.close();
    }
  });

  test('GetPluginCapabilities: every instance of the same version returns the same set, wherever it runs', async () => {
    const other = await startTestDriver({
      nodeId: 'another-node',
      defaultMetadataStyle: 'FIXED',
      defaultBlockSize: 65536,
    });
    try {
      const here = await d.identity.call('getPluginCapabilities', {});
      const there = await other.identity.call('getPluginCapabilities', {});
      expect(there.capabilities.map(describeCapability).sort()).toEqual(
        here.capabilities.map(describeCapability).sort(),
      );
    } finally {
      await other.stop();
    }
  });

  test('GetPluginCapabilities: CONTROLLER_SERVICE is claimed, so the Controller service answers its REQUIRED ControllerGetCapabilities', async () => {
    const res = await d.controller.call('controllerGetCapabilities', {});
    expect(res.capabilities.length).toBeGreaterThan(0);
  });

  test('GetPluginCapabilities: ONLINE volume expansion is claimed, so the controller reports EXPAND_VOLUME', async () => {
    const res = await d.controller.call('controllerGetCapabilities', {});
    const rpcs = res.capabilities.map((c) => (c.type.case === 'rpc' ? c.type.value.type : undefined));
    expect(rpcs).toContain(ControllerServiceCapability_RPC_Type.EXPAND_VOLUME);
  });

  test('GetPluginCapabilities: SNAPSHOT_METADATA_SERVICE is claimed, so both SnapshotMetadata RPCs are served (not UNIMPLEMENTED)', async () => {
    // An empty request is the cheapest call a served method must refuse with INVALID_ARGUMENT.
    expect(await codeOf(d.metadata.collect('getMetadataAllocated', {}))).toBe(status.INVALID_ARGUMENT);
    expect(await codeOf(d.metadata.collect('getMetadataDelta', {}))).toBe(status.INVALID_ARGUMENT);
  });
});

describe('Probe', () => {
  test('Probe: a started driver answers OK with ready = true', async () => {
    const res = await d.identity.call('probe', {});
    expect(res.ready).toBe(true);
  });

  test('Probe: may be called many times; every call answers ready', async () => {
    const answers = await Promise.all(Array.from({ length: 20 }, () => d.identity.call('probe', {})));
    expect(answers.map((a) => a.ready)).toEqual(Array.from({ length: 20 }, () => true));
  });
});
