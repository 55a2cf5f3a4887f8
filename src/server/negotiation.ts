/**
 * Content negotiation as kube-apiserver does it: the first media range of the Accept header that
 * this server can produce wins. Protobuf and CBOR are never produced; a client that lists them
 * first (client-go's default: protobuf, then any type) gets JSON.
 */
import { errors } from './errors.ts';

export type OutputShape =
  | { kind: 'object' }
  | { kind: 'table'; version: 'v1' | 'v1beta1' }
  | { kind: 'partial'; version: 'v1' | 'v1beta1' }
  | { kind: 'partialList'; version: 'v1' | 'v1beta1' }
  | { kind: 'discovery'; version: 'v2' | 'v2beta1' };

export interface Negotiated {
  readonly mediaType: 'application/json' | 'application/yaml';
  readonly shape: OutputShape;
  /** The Content-Type to answer with. */
  readonly contentType: string;
}

interface MediaRange {
  type: string;
  params: Record<string, string>;
  q: number;
}

export function parseAccept(header: string | undefined): MediaRange[] {
  if (!header || header.trim() === '') return [{ type: '*/*', params: {}, q: 1 }];
  const ranges: MediaRange[] = [];
  for (const part of header.split(',')) {
    const [typePart, ...paramParts] = part.split(';');
    const type = (typePart ?? '').trim().toLowerCase();
    if (!type) continue;
    const params: Record<string, string> = {};
    let q = 1;
    for (const p of paramParts) {
      const eq = p.indexOf('=');
      if (eq === -1) continue;
      const k = p.slice(0, eq).trim().toLowerCase();
      const v = p.slice(eq + 1).trim().replace(/^"|"$/g, '');
      if (k === 'q') q = Number(v);
      else params[k] = v;
    }
    if (q > 0) ranges.push({ type, params, q });
  }
  // Stable sort by q keeps the client's order among equals, as kube does.
  return ranges.map((r, i) => ({ r, i })).sort((a, b) => b.r.q - a.r.q || a.i - b.i).map((x) => x.r);
}

export type Endpoint = 'get' | 'list' | 'discovery' | 'plain';

function jsonLike(type: string): 'application/json' | 'application/yaml' | undefined {
  if (type === 'application/json' || type === '*/*' || type === 'application/*') return 'application/json';
  if (type === 'application/yaml') return 'application/yaml';
  return undefined;
}

function shapeFor(params: Record<string, string>, endpoint: Endpoint): OutputShape | undefined {
  const as = params['as'];
  if (as === undefined) return { kind: 'object' };
  const g = params['g'];
  const v = params['v'];
  if (endpoint === 'discovery') {
    if (as === 'APIGroupDiscoveryList' && g === 'apidiscovery.k8s.io' && (v === 'v2' || v === 'v2beta1')) {
      return { kind: 'discovery', version: v };
    }
    return undefined;
  }
  if (endpoint === 'plain' || g !== 'meta.k8s.io' || (v !== 'v1' && v !== 'v1beta1')) return undefined;
  if (as === 'Table') return { kind: 'table', version: v };
  if (as === 'PartialObjectMetadata' && endpoint === 'get') return { kind: 'partial', version: v };
  if (as === 'PartialObjectMetadataList' && endpoint === 'list') return { kind: 'partialList', version: v };
  return undefined;
}

function contentTypeOf(mediaType: string, shape: OutputShape): string {
  switch (shape.kind) {
    case 'object':
      return mediaType;
    case 'table':
      return `${mediaType};as=Table;g=meta.k8s.io;v=${shape.version}`;
    case 'partial':
      return `${mediaType};as=PartialObjectMetadata;g=meta.k8s.io;v=${shape.version}`;
    case 'partialList':
      return `${mediaType};as=PartialObjectMetadataList;g=meta.k8s.io;v=${shape.version}`;
    case 'discovery':
      return `${mediaType};g=apidiscovery.k8s.io;v=${shape.version};as=APIGroupDiscoveryList`;
  }
}

const PRODUCED = ['application/json', 'application/yaml', 'application/json;as=Table;v=v1;g=meta.k8s.io'];

/** Chooses the response format; throws 406 NotAcceptable when nothing listed can be produced. */
export function negotiate(accept: string | undefined, endpoint: Endpoint): Negotiated {
  for (const range of parseAccept(accept)) {
    const mediaType = jsonLike(range.type);
    if (!mediaType) continue;
    const shape = shapeFor(range.params, endpoint);
    if (!shape) continue;
    return { mediaType, shape, contentType: contentTypeOf(mediaType, shape) };
  }
  throw errors.notAcceptable(PRODUCED);
}
