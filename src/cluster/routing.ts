/**
 * Routing by owner, generic over services and methods. Each method of a service implementation is wrapped:
 * the request's object handles (id-fields.ts) say which node owns what it names. This node's objects, and
 * handles without an owner, are served here: the owner suffix is taken off the request's handles for the
 * service (which speaks the engine's IDs) and put on the reply's. Another node's objects are forwarded to it
 * (PeerClients), or refused, by the policy of the listener the call came in on. So any method that names an
 * object is routed, including methods added later.
 */
import type { DescMessage, DescMethod, DescService, MessageShape } from '@bufbuild/protobuf';
import { Code, ConnectError, type HandlerContext, type ServiceImpl } from '@connectrpc/connect';
import { noteTuples } from '../csi/block-metadata-wire.js';
import { forwardedToKey } from '../rpc/interceptors.js';
import { idsIn, mapIds } from './id-fields.js';
import { ownedHandle, ownerOf, withoutOwner } from './node-handles.js';
import { countField } from './passthrough.js';
import type { PeerClients } from './peer-client.js';

/**
 * What a listener does with a request for another node's objects:
 * - `forward`: call the owner and pass its answer through (the CSI socket: Controller, GroupController,
 *   SnapshotMetadata);
 * - `own-only`: refuse with UNAVAILABLE (the peer listener: a peer sent it here believing this node is the
 *   owner, so its address for that node is stale; never forwarded again, so there are no loops);
 * - `node-local`: refuse with NOT_FOUND (Node: the data plane serves only volumes on this node).
 */
export type RoutePolicy = 'forward' | 'own-only' | 'node-local';

export interface Routing {
  /** This node's ID: the owner named in the handles it hands out. */
  readonly self: string;
  readonly peers: PeerClients;
}

type Handler = (request: object, ctx: HandlerContext) => unknown;

/** `impl` with every method routed by owner. */
export function routedService<S extends DescService>(
  service: S,
  impl: Partial<ServiceImpl<S>>,
  routing: Routing,
  policy: RoutePolicy,
): Partial<ServiceImpl<S>> {
  const handlers = impl as Record<string, Handler | undefined>;
  const routed: Record<string, Handler> = {};
  for (const method of service.methods) {
    const local = handlers[method.localName]?.bind(impl);
    // A method we do not implement stays unimplemented, wherever its objects are.
    if (!local) continue;
    if (method.methodKind === 'unary') routed[method.localName] = routedUnary(method, local, routing, policy);
    else if (method.methodKind === 'server_streaming') {
      routed[method.localName] = routedServerStream(method, local, routing, policy);
    } else routed[method.localName] = local;
  }
  return routed as Partial<ServiceImpl<S>>;
}

function routedUnary(method: DescMethod, local: Handler, routing: Routing, policy: RoutePolicy): Handler {
  return async (request, ctx) => {
    const owner = elsewhere(method, request, routing.self, policy);
    if (owner !== undefined) {
      ctx.values.set(forwardedToKey, owner);
      return routing.peers.unary(owner, method, request as MessageShape<DescMessage>, ctx);
    }
    ownHandlesToIds(method.input, request, routing.self);
    const reply = (await local(request, ctx)) as object;
    idsToOwnHandles(method.output, reply, routing.self);
    return reply;
  };
}

function routedServerStream(method: DescMethod, local: Handler, routing: Routing, policy: RoutePolicy): Handler {
  const tuplesField = method.output.fields.find((f) => f.name === 'block_metadata')?.number;
  return async function* (request: object, ctx: HandlerContext) {
    const owner = elsewhere(method, request, routing.self, policy);
    if (owner !== undefined) {
      ctx.values.set(forwardedToKey, owner);
      for await (const { message, bytes } of routing.peers.serverStream(
        owner,
        method,
        request as MessageShape<DescMessage>,
        ctx,
      )) {
        // The forwarding node's log line and metrics count the tuples it passed on, as the owner's do.
        if (tuplesField !== undefined) noteTuples(message, countField(bytes, tuplesField));
        yield message;
      }
      return;
    }
    ownHandlesToIds(method.input, request, routing.self);
    const replies = local(request, ctx) as AsyncIterable<object>;
    for await (const reply of replies) {
      idsToOwnHandles(method.output, reply, routing.self);
      yield reply;
    }
  };
}

/**
 * The node that owns what the request names, when that is not this node; undefined to serve it here.
 * Handles without an owner count as this node's. Throws when the policy refuses another node's objects,
 * or when the request names objects of several nodes.
 */
function elsewhere(method: DescMethod, request: object, self: string, policy: RoutePolicy): string | undefined {
  const ids = idsIn(method.input, request);
  if (ids.length === 0) return undefined;
  const owners = [...new Set(ids.map((id) => ownerOf(id) ?? self))];
  if (owners.length > 1) {
    throw new ConnectError(
      `the request names objects on nodes ${owners.join(', ')}: one request can only name objects of one node (volumes, their snapshots, clones and restores stay on the node that holds them)`,
      Code.InvalidArgument,
    );
  }
  const owner = owners[0]!;
  if (owner === self) return undefined;
  if (policy === 'node-local') {
    throw new ConnectError(
      `volume ${ids[0]} is on node ${owner}, not on this node (${self}): only ${owner} can serve it`,
      Code.NotFound,
    );
  }
  if (policy === 'own-only') {
    throw new ConnectError(
      `node ${owner}, which holds this object, is unavailable: the request reached node ${self} instead (a stale peer address)`,
      Code.Unavailable,
    );
  }
  return owner;
}

function ownHandlesToIds(desc: DescMessage, message: object, self: string): void {
  mapIds(desc, message, (handle) => withoutOwner(handle, self));
}

function idsToOwnHandles(desc: DescMessage, message: object, self: string): void {
  mapIds(desc, message, (id) => ownedHandle(id, self));
}
