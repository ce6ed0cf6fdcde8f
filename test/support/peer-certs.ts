/**
 * Certificates for driver-to-driver mutual TLS in tests, made with the openssl command (Debian's `openssl`
 * package): a CA and a peer certificate signed by it (DNS name cbt-csi-peer, for server and client use),
 * as the chart makes them; and a second, unrelated CA with its own peer certificate, which real peers must
 * refuse.
 */
import { execFileSync } from 'node:child_process';
import fs from 'node:fs';
import path from 'node:path';
import { PEER_TLS_NAME } from '../../src/cluster/peer-tls.js';

export interface PeerCertFiles {
  cert: string;
  key: string;
  ca: string;
}

export interface PeerCerts {
  /** Signed by the cluster's peer CA. */
  valid: PeerCertFiles;
  /** A certificate from another CA (same name), with that CA as its trust: what an outsider has. */
  foreign: PeerCertFiles;
}

/** Why openssl cannot be used here, or undefined. */
export function missingOpenssl(): string | undefined {
  try {
    execFileSync('openssl', ['version'], { stdio: 'ignore' });
    return undefined;
  } catch {
    return 'the openssl command is not installed (Debian package openssl)';
  }
}

/** Makes both sets under `dir`. */
export function makePeerCerts(dir: string): PeerCerts {
  fs.mkdirSync(dir, { recursive: true, mode: 0o700 });
  return { valid: authorityWithPeer(dir, 'cluster'), foreign: authorityWithPeer(dir, 'foreign') };
}

function authorityWithPeer(dir: string, name: string): PeerCertFiles {
  const file = (suffix: string) => path.join(dir, `${name}-${suffix}`);
  const openssl = (args: string[]) => execFileSync('openssl', args, { stdio: ['ignore', 'ignore', 'pipe'] });
  openssl([
    'req',
    '-x509',
    '-newkey',
    'ec',
    '-pkeyopt',
    'ec_paramgen_curve:prime256v1',
    '-nodes',
    '-keyout',
    file('ca.key'),
    '-out',
    file('ca.crt'),
    '-days',
    '2',
    '-subj',
    `/CN=${name} peer CA`,
  ]);
  openssl([
    'req',
    '-newkey',
    'ec',
    '-pkeyopt',
    'ec_paramgen_curve:prime256v1',
    '-nodes',
    '-keyout',
    file('peer.key'),
    '-out',
    file('peer.csr'),
    '-subj',
    `/CN=${PEER_TLS_NAME}`,
  ]);
  fs.writeFileSync(
    file('peer.ext'),
    `subjectAltName=DNS:${PEER_TLS_NAME}\nextendedKeyUsage=serverAuth,clientAuth\nkeyUsage=digitalSignature,keyEncipherment\n`,
  );
  openssl([
    'x509',
    '-req',
    '-in',
    file('peer.csr'),
    '-CA',
    file('ca.crt'),
    '-CAkey',
    file('ca.key'),
    '-CAcreateserial',
    '-out',
    file('peer.crt'),
    '-days',
    '2',
    '-extfile',
    file('peer.ext'),
  ]);
  return { cert: file('peer.crt'), key: file('peer.key'), ca: file('ca.crt') };
}
