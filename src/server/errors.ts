/**
 * The one error catalogue of the API server. Every error a client can see is an {@link ApiError}
 * with a stable Kubernetes `reason`, an HTTP status and a message, and is answered as a
 * `meta.k8s.io/v1` `Status` object (test/server/errors.test.ts keeps catalogue and docs in step).
 */

/** Reasons of `metav1.StatusReason` used by this server, with their HTTP codes. */
export const STATUS_REASONS = {
  BadRequest: 400,
  Unauthorized: 401,
  Forbidden: 403,
  NotFound: 404,
  MethodNotAllowed: 405,
  NotAcceptable: 406,
  AlreadyExists: 409,
  Conflict: 409,
  Gone: 410,
  Expired: 410,
  RequestEntityTooLarge: 413,
  UnsupportedMediaType: 415,
  Invalid: 422,
  TooManyRequests: 429,
  InternalError: 500,
  ServiceUnavailable: 503,
  Timeout: 504,
} as const;

export type StatusReason = keyof typeof STATUS_REASONS;

export interface StatusCause {
  readonly reason?: string;
  readonly message: string;
  readonly field?: string;
}

export interface StatusDetails {
  readonly name?: string;
  readonly group?: string;
  readonly kind?: string;
  readonly uid?: string;
  readonly causes?: readonly StatusCause[];
  readonly retryAfterSeconds?: number;
}

/** The wire form of `meta.k8s.io/v1` Status. */
export interface Status {
  readonly kind: 'Status';
  readonly apiVersion: 'v1';
  readonly metadata: Record<string, never>;
  readonly status: 'Success' | 'Failure';
  readonly message?: string;
  readonly reason?: StatusReason | '';
  readonly details?: StatusDetails;
  readonly code: number;
}

export class ApiError extends Error {
  readonly reason: StatusReason;
  readonly code: number;
  readonly details: StatusDetails | undefined;

  constructor(reason: StatusReason, message: string, details?: StatusDetails, options?: ErrorOptions) {
    super(message, options);
    this.name = 'ApiError';
    this.reason = reason;
    this.code = STATUS_REASONS[reason];
    this.details = details;
  }

  toStatus(): Status {
    return {
      kind: 'Status',
      apiVersion: 'v1',
      metadata: {},
      status: 'Failure',
      message: this.message,
      reason: this.reason,
      ...(this.details ? { details: this.details } : {}),
      code: this.code,
    };
  }
}

export function successStatus(details?: StatusDetails): Status {
  return { kind: 'Status', apiVersion: 'v1', metadata: {}, status: 'Success', ...(details ? { details } : {}), code: 200 };
}

/** `<resource>.<group>` as kube-apiserver names a group resource in messages. */
export interface GroupResource {
  readonly group: string;
  readonly resource: string;
}

const qualified = (gr: GroupResource) => (gr.group ? `${gr.resource}.${gr.group}` : gr.resource);

export const errors = {
  notFound: (gr: GroupResource, name: string) =>
    new ApiError('NotFound', `${qualified(gr)} "${name}" not found`, { name, group: gr.group, kind: gr.resource }),

  alreadyExists: (gr: GroupResource, name: string) =>
    new ApiError('AlreadyExists', `${qualified(gr)} "${name}" already exists`, {
      name,
      group: gr.group,
      kind: gr.resource,
    }),

  conflict: (gr: GroupResource, name: string, why: string) =>
    new ApiError('Conflict', `Operation cannot be fulfilled on ${qualified(gr)} "${name}": ${why}`, {
      name,
      group: gr.group,
      kind: gr.resource,
    }),

  /** 422 with one cause per field error, message in kube's aggregate form. */
  invalid: (gr: GroupResource, kind: string, name: string, causes: readonly StatusCause[]) => {
    const list = causes.map((c) => (c.field ? `${c.field}: ${c.message}` : c.message));
    const joined = list.length === 1 ? list[0] : `[${list.join(', ')}]`;
    return new ApiError('Invalid', `${kind}.${gr.group} "${name}" is invalid: ${joined}`, {
      name,
      group: gr.group,
      kind,
      causes,
    });
  },

  badRequest: (message: string, causes?: readonly StatusCause[]) =>
    new ApiError('BadRequest', message, causes ? { causes } : undefined),

  methodNotAllowed: (verb: string, what: string) =>
    new ApiError('MethodNotAllowed', `${verb} is not supported on ${what}`),

  unsupportedMediaType: (contentType: string, supported: readonly string[]) =>
    new ApiError(
      'UnsupportedMediaType',
      `the body of the request was in an unknown format - accepted media types include: ${supported.join(', ')}`,
      { causes: [{ reason: 'UnsupportedMediaType', message: `unsupported media type "${contentType}"` }] },
    ),

  notAcceptable: (supported: readonly string[]) =>
    new ApiError('NotAcceptable', `only the following media types are accepted: ${supported.join(', ')}`),

  expired: (message: string) => new ApiError('Expired', message),

  gone: (message: string) => new ApiError('Gone', message),

  tooLarge: (limitBytes: number) =>
    new ApiError('RequestEntityTooLarge', `the request body is larger than the limit of ${limitBytes} bytes`),

  unauthorized: (message = 'Unauthorized: a client certificate signed by the server\'s client CA, or valid credentials, are required') =>
    new ApiError('Unauthorized', message),

  forbidden: (user: string, verb: string, gr: GroupResource, name: string | undefined, why: string) =>
    new ApiError(
      'Forbidden',
      `${qualified(gr)}${name ? ` "${name}"` : ''} is forbidden: User "${user}" cannot ${verb} resource "${gr.resource}" in API group "${gr.group}"${why ? `: ${why}` : ''}`,
      { ...(name ? { name } : {}), group: gr.group, kind: gr.resource },
    ),

  unavailable: (message: string, retryAfterSeconds = 1) =>
    new ApiError('ServiceUnavailable', message, { retryAfterSeconds }),

  internal: (message: string, cause?: unknown) =>
    new ApiError('InternalError', `Internal error occurred: ${message}`, { causes: [{ message }] }, { cause }),

  timeout: (message: string) => new ApiError('Timeout', message),
} as const;

/** Turns anything thrown into an ApiError, keeping the original as `cause`. */
export function toApiError(err: unknown): ApiError {
  if (err instanceof ApiError) return err;
  const message = err instanceof Error ? err.message : String(err);
  return errors.internal(message, err);
}
