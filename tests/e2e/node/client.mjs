#!/usr/bin/env node
// A Node.js client of bms.image.v1, written the way a team with no Python
// would write one: @grpc/grpc-js for the calls, @grpc/proto-loader reading
// the service's own .proto files (no reflection, no generated code), and
// protobufjs for the google.rpc error details.
//
//   BMS_TOKEN_A=... BMS_TOKEN_B=... node tests/e2e/node/client.mjs 127.0.0.1:50051
//
// The tokens (of two different projects, from `bms-image token --project P`)
// come from the environment so they never show in `ps`; the address is the
// first argument (or BMS_ADDRESS). It walks through the catalog, a private
// image shared from project A to project B, a streamed deployment and the
// rich errors, prints one JSON document with what it saw and exits 0 — or
// prints {"ok": false, "step": ..., "error": ...} and exits 1 on the first
// thing that is not as documented.
//
// Field names: keepCase is true everywhere (requests and responses use the
// proto names, `display_name`, exactly as grpcurl and the README do); int64
// fields come back as decimal strings, enums as their names.

import { createHash, randomBytes, randomUUID } from "node:crypto";
import { existsSync, readdirSync } from "node:fs";
import { createRequire } from "node:module";
import path from "node:path";
import { fileURLToPath } from "node:url";

import grpc from "@grpc/grpc-js";
import protoLoader from "@grpc/proto-loader";
import protobuf from "protobufjs";

const HERE = path.dirname(fileURLToPath(import.meta.url));
const ROOT = path.resolve(HERE, "..", "..", "..");
// The API as released: the repository's protos, read as files.
const PROTOS = process.env.BMS_PROTOS_DIR || path.join(ROOT, "protos");
// google/rpc/{status,error_details}.proto, for the error details: the copy
// the googleapis-common-protos wheel (a dependency of grpcio-status) installs
// in the virtualenv's site-packages, or BMS_GOOGLEAPIS_DIR. Our protos import
// only google/protobuf/{empty,field_mask,timestamp}, which protobufjs bundles.
const GOOGLEAPIS = process.env.BMS_GOOGLEAPIS_DIR || installedGoogleapis();

function installedGoogleapis() {
  const lib = path.join(ROOT, ".venv", "lib");
  for (const python of existsSync(lib) ? readdirSync(lib).sort() : []) {
    const sitePackages = path.join(lib, python, "site-packages");
    if (existsSync(path.join(sitePackages, "google", "rpc", "status.proto"))) {
      return sitePackages;
    }
  }
  throw new Error(
    `no google/rpc/status.proto under ${lib} (googleapis-common-protos): ` +
      "install the project (uv sync) or set BMS_GOOGLEAPIS_DIR",
  );
}

const LOADER_OPTIONS = {
  keepCase: true,
  longs: String,
  enums: String,
  defaults: true,
  oneofs: true,
  includeDirs: [PROTOS, GOOGLEAPIS],
};
const UNARY_DEADLINE_MS = 20_000;
const STREAM_DEADLINE_MS = 90_000;

const require = createRequire(import.meta.url);

class Failure extends Error {}

function check(condition, message, details) {
  if (!condition) {
    const suffix = details === undefined ? "" : `: ${JSON.stringify(details)}`;
    throw new Failure(`${message}${suffix}`);
  }
}

// -- the API, loaded from the .proto files -----------------------------------

function loadApi() {
  const directory = path.join(PROTOS, "bms", "image", "v1");
  const files = readdirSync(directory)
    .filter((name) => name.endsWith(".proto"))
    .sort()
    .map((name) => `bms/image/v1/${name}`);
  check(files.length > 0, `no .proto files in ${directory}`);
  const definition = protoLoader.loadSync(files, LOADER_OPTIONS);
  const v1 = grpc.loadPackageDefinition(definition).bms.image.v1;
  for (const service of ["ImageService", "SharingService", "ProvisioningService"]) {
    check(typeof v1[service] === "function", `the protos define no bms.image.v1.${service}`);
  }
  return { files, v1 };
}

function loadErrorDetails() {
  const root = new protobuf.Root();
  root.resolvePath = (_origin, target) => path.join(GOOGLEAPIS, target);
  root.loadSync(["google/rpc/status.proto", "google/rpc/error_details.proto"], {
    keepCase: true,
  });
  root.resolveAll();
  return root;
}

let ERROR_TYPES = null; // set by main(): the google.rpc types
const CODE_NAMES = Object.fromEntries(Object.entries(grpc.status).map(([name, n]) => [n, name]));

// -- calls --------------------------------------------------------------------

function auth(token) {
  const metadata = new grpc.Metadata();
  metadata.set("authorization", `Bearer ${token}`);
  return metadata;
}

function deadline(ms) {
  return { deadline: new Date(Date.now() + ms) };
}

function unary(client, method, request, token) {
  check(typeof client[method] === "function", `no method ${method} in the protos`);
  return new Promise((resolve, reject) => {
    client[method](request, auth(token), deadline(UNARY_DEADLINE_MS), (error, response) =>
      error ? reject(error) : resolve(response),
    );
  });
}

function serverStream(client, method, request, token) {
  check(typeof client[method] === "function", `no method ${method} in the protos`);
  return new Promise((resolve, reject) => {
    const messages = [];
    const call = client[method](request, auth(token), deadline(STREAM_DEADLINE_MS));
    call.on("data", (message) => messages.push(message));
    call.on("error", reject);
    call.on("end", () => resolve(messages));
  });
}

function clientStream(client, method, requests, token) {
  check(typeof client[method] === "function", `no method ${method} in the protos`);
  return new Promise((resolve, reject) => {
    const call = client[method](auth(token), deadline(STREAM_DEADLINE_MS), (error, response) =>
      error ? reject(error) : resolve(response),
    );
    for (const request of requests) call.write(request);
    call.end();
  });
}

// A failed call as a client sees it: the status code, and the google.rpc
// details decoded from the `grpc-status-details-bin` trailer.
function describeError(error) {
  if (error === null || typeof error !== "object" || !("code" in error)) return null;
  const described = {
    code: CODE_NAMES[error.code] ?? String(error.code),
    message: error.details ?? "",
    details: [],
  };
  const raw = error.metadata?.get("grpc-status-details-bin") ?? [];
  if (raw.length === 0 || ERROR_TYPES === null) return described;
  const Status = ERROR_TYPES.lookupType("google.rpc.Status");
  const status = Status.toObject(Status.decode(raw[0]), { longs: String, enums: String });
  described.status_code_matches = status.code === error.code;
  for (const any of status.details ?? []) {
    const typeName = any.type_url.slice(any.type_url.lastIndexOf("/") + 1);
    const type = ERROR_TYPES.lookupType(typeName);
    const detail = type.toObject(type.decode(any.value), { longs: String, enums: String });
    described.details.push({ "@type": typeName, ...detail });
    if (typeName === "google.rpc.ErrorInfo") {
      described.reason = detail.reason;
      described.domain = detail.domain;
    }
  }
  return described;
}

async function expectError(step, promise, code, reason) {
  let response;
  try {
    response = await promise;
  } catch (error) {
    const described = describeError(error);
    check(described !== null, `${step}: not a gRPC error`, String(error));
    check(described.code === code, `${step}: expected ${code}, got ${described.code}`, described);
    check(
      described.reason === reason,
      `${step}: expected ErrorInfo reason ${reason}, got ${described.reason}`,
      described,
    );
    check(described.status_code_matches === true, `${step}: google.rpc.Status.code differs`);
    return described;
  }
  throw new Failure(`${step}: expected ${code} ${reason}, the call succeeded: ${JSON.stringify(response)}`);
}

async function listAll(client, method, field, request, token) {
  const items = [];
  let page_token = "";
  for (let page = 0; page < 100; page += 1) {
    const response = await unary(client, method, { ...request, page_token }, token);
    items.push(...response[field]);
    page_token = response.next_page_token;
    if (!page_token) return items;
  }
  throw new Failure(`${method}: more than 100 pages`);
}

// -- the walkthrough ----------------------------------------------------------

async function walk(address, tokenA, tokenB, result) {
  const { files, v1 } = loadApi();
  result.protos = files;
  const credentials = grpc.credentials.createInsecure();
  const images = new v1.ImageService(address, credentials);
  const sharing = new v1.SharingService(address, credentials);
  const provisioning = new v1.ProvisioningService(address, credentials);
  const clients = [images, sharing, provisioning];
  try {
    await steps({ images, sharing, provisioning }, tokenA, tokenB, result);
  } finally {
    for (const client of clients) client.close();
  }
}

async function steps({ images, sharing, provisioning }, tokenA, tokenB, result) {
  // 1. The public catalog, every page (3 a page, to follow next_page_token).
  result.step = "catalog";
  const catalog = await listAll(
    images,
    "ListImages",
    "images",
    { page_size: 3, filter: "type = public" },
    tokenA,
  );
  check(catalog.length > 0, "the catalog is empty");
  check(
    catalog.every((image) => image.type === "IMAGE_TYPE_PUBLIC"),
    "`type = public` lists only public images",
    catalog.map((image) => image.type),
  );
  result.catalog = {
    count: catalog.length,
    types: [...new Set(catalog.map((image) => image.type))],
    statuses: [...new Set(catalog.map((image) => image.status))],
    names: catalog.map((image) => image.name),
  };

  // 2. A private image in project A, and its bytes (client stream).
  result.step = "create private image";
  const created = await unary(
    images,
    "CreateImage",
    {
      image: {
        display_name: "node-golden",
        description: "made by the Node.js client",
        os_type: "OS_TYPE_LINUX",
        os_distro: "centos",
        os_version: "7.6",
        architecture: "ARCHITECTURE_X86_64",
        hardware_model: "s4-2288h-v5",
        tags: ["node", "e2e"],
      },
      request_id: randomUUID(),
    },
    tokenA,
  );
  check(created.status === "IMAGE_STATUS_QUEUED", "a new image is QUEUED", created.status);
  check(created.type === "IMAGE_TYPE_PRIVATE", "a new image is PRIVATE", created.type);

  result.step = "upload image data";
  const bytes = randomBytes(256 * 1024);
  const sha256 = createHash("sha256").update(bytes).digest("hex");
  const chunks = [bytes.subarray(0, 100_000), bytes.subarray(100_000)];
  const uploaded = await clientStream(
    images,
    "UploadImageData",
    [
      { metadata: { name: created.name, size_bytes: bytes.length, sha256 } },
      ...chunks.map((chunk) => ({ chunk })),
    ],
    tokenA,
  );
  check(uploaded.status === "IMAGE_STATUS_ACTIVE", "uploaded image is ACTIVE", uploaded.status);
  check(uploaded.sha256 === sha256, "the service computed the same SHA-256", uploaded.sha256);
  check(uploaded.size_bytes === String(bytes.length), "size_bytes (int64, a string)", uploaded.size_bytes);
  result.private_image = {
    name: created.name,
    created_status: created.status,
    status: uploaded.status,
    type: uploaded.type,
    owner_project: uploaded.owner_project,
    size_bytes: uploaded.size_bytes,
    sha256: uploaded.sha256,
    disk_format: uploaded.disk_format,
    supported_flavors: uploaded.supported_flavors,
    create_time_is_timestamp: typeof uploaded.create_time?.seconds === "string",
  };

  // 3. Error path: B cannot see it yet; NOT_FOUND, never PERMISSION_DENIED.
  result.step = "hidden from project B";
  result.errors = {};
  result.errors.get_before_sharing = await expectError(
    "GetImage by B before sharing",
    unary(images, "GetImage", { name: created.name }, tokenB),
    "NOT_FOUND",
    "IMAGE_NOT_FOUND",
  );

  // 4. A shares it with B; the member starts PENDING.
  result.step = "share with project B";
  const projectB = process.env.BMS_PROJECT_B;
  check(projectB, "BMS_PROJECT_B (the project of BMS_TOKEN_B) is not set");
  const member = await unary(
    sharing,
    "CreateImageMember",
    { parent: created.name, member: { member_project: projectB } },
    tokenA,
  );
  check(member.status === "MEMBER_STATUS_PENDING", "a new member is PENDING", member.status);
  const pending = await listAll(
    images,
    "ListImages",
    "images",
    { filter: "member_status = pending" },
    tokenB,
  );
  result.member = {
    name: member.name,
    status: member.status,
    pending_for_b: pending.map((image) => image.name),
  };

  // 5. Only the member answers: the owner gets PERMISSION_DENIED.
  result.step = "owner cannot accept";
  const accept = {
    member: { name: member.name, status: "MEMBER_STATUS_ACCEPTED" },
    update_mask: { paths: ["status"] },
  };
  result.errors.owner_accepts = await expectError(
    "UpdateImageMember by the owner",
    unary(sharing, "UpdateImageMember", accept, tokenA),
    "PERMISSION_DENIED",
    "ONLY_MEMBER_ANSWERS",
  );

  // 6. B accepts, then lists it as SHARED and downloads it (server stream).
  result.step = "accept as project B";
  const accepted = await unary(sharing, "UpdateImageMember", accept, tokenB);
  check(accepted.status === "MEMBER_STATUS_ACCEPTED", "B accepted", accepted.status);
  result.member.accepted_status = accepted.status;

  result.step = "list as project B";
  const seenByB = await listAll(images, "ListImages", "images", {}, tokenB);
  const shared = seenByB.filter((image) => image.type === "IMAGE_TYPE_SHARED");
  const onlyShared = await listAll(images, "ListImages", "images", { filter: "type = shared" }, tokenB);
  result.listed_by_b = {
    count: seenByB.length,
    shared: shared.map(({ name, type, owner_project, status }) => ({ name, type, owner_project, status })),
    filtered_shared: onlyShared.map((image) => image.name),
  };
  check(
    shared.some((image) => image.name === created.name),
    "B lists the accepted image as SHARED",
    result.listed_by_b,
  );

  result.step = "download as project B";
  const pieces = await serverStream(images, "DownloadImageData", { name: created.name }, tokenB);
  check(pieces.length > 0, "the download sent nothing");
  const last = pieces[pieces.length - 1];
  const downloaded = Buffer.concat(pieces.map((piece) => piece.chunk));
  const downloadedSha = createHash("sha256").update(downloaded).digest("hex");
  check(last.last === true, "the last download message says so", last);
  check(last.sha256 === downloadedSha, "downloaded bytes match the announced SHA-256");
  check(downloadedSha === sha256, "downloaded bytes are the uploaded ones");
  result.download = { messages: pieces.length, bytes: downloaded.length, sha256: downloadedSha };

  // 7. A deployment, followed to the end: flavors first, then a public image
  //    the flavor lists.
  result.step = "list flavors";
  const flavors = await listAll(provisioning, "ListFlavors", "flavors", {}, tokenA);
  const usable = new Set(
    catalog.filter((image) => image.status === "IMAGE_STATUS_ACTIVE" && !image.deprecated).map((i) => i.name),
  );
  const flavor = flavors.find((f) => f.public_images.some((name) => usable.has(name)));
  check(flavor, "no flavor lists an active public image", flavors.map((f) => f.name));
  const image = flavor.public_images.find((name) => usable.has(name));
  result.flavors = flavors.map((f) => f.name);

  result.step = "deploy";
  const events = await serverStream(
    provisioning,
    "CreateServers",
    { flavor: flavor.name, image, count: 2, name_prefix: "node" },
    tokenA,
  );
  check(events.length > 0, "CreateServers streamed no event");
  // Each server's stages in order, repeats (IMAGE_STREAMING progress) folded.
  const byServer = new Map();
  for (const event of events) {
    if (!byServer.has(event.server)) byServer.set(event.server, []);
    const stages = byServer.get(event.server);
    if (stages[stages.length - 1] !== event.stage) stages.push(event.stage);
  }
  const final = events[events.length - 1];
  result.deployment = {
    flavor: flavor.name,
    image,
    events: events.length,
    servers: Object.fromEntries(byServer),
    last: { stage: final.stage, state: final.state, percent: final.percent },
    failures: events
      .filter((event) => event.stage === "PROVISIONING_STAGE_FAILED")
      .map(({ server, error_code, error_reason, message }) => ({ server, error_code, error_reason, message })),
  };
  check(byServer.size === 2, "events of two servers", result.deployment);
  check(final.stage === "PROVISIONING_STAGE_ACTIVE", "the last event is ACTIVE", result.deployment);
  for (const [server, stages] of byServer) {
    check(stages[0] === "PROVISIONING_STAGE_VALIDATING", `${server} starts VALIDATING`, stages);
    check(stages[stages.length - 1] === "PROVISIONING_STAGE_ACTIVE", `${server} ends ACTIVE`, stages);
    const got = await unary(provisioning, "GetServer", { name: server }, tokenA);
    check(got.state === "SERVER_STATE_ACTIVE", `${server} is ACTIVE`, got.state);
  }

  // 8. Error path on a stream: an image the flavor does not list.
  result.step = "incompatible deployment";
  const other = catalog.find((i) => !flavor.public_images.includes(i.name) && usable.has(i.name));
  if (other) {
    result.errors.incompatible = await expectError(
      "CreateServers with an image the flavor does not list",
      serverStream(
        provisioning,
        "CreateServers",
        { flavor: flavor.name, image: other.name, count: 1, name_prefix: "nope" },
        tokenA,
      ),
      "FAILED_PRECONDITION",
      "IMAGE_FLAVOR_INCOMPATIBLE",
    );
  }

  // 9. A bad argument: INVALID_ARGUMENT with a google.rpc.BadRequest.
  result.step = "invalid argument";
  result.errors.bad_name = await expectError(
    "GetImage with a malformed name",
    unary(images, "GetImage", { name: "not-an-image" }, tokenA),
    "INVALID_ARGUMENT",
    "INVALID_FIELD",
  );
  check(
    result.errors.bad_name.details.some((d) => d["@type"] === "google.rpc.BadRequest"),
    "INVALID_ARGUMENT carries a google.rpc.BadRequest",
    result.errors.bad_name,
  );
  result.step = "done";
}

async function main() {
  const address = process.argv[2] || process.env.BMS_ADDRESS;
  const tokenA = process.env.BMS_TOKEN_A;
  const tokenB = process.env.BMS_TOKEN_B;
  const result = { ok: false, step: "start", node: process.version };
  try {
    check(address, "usage: node client.mjs HOST:PORT (tokens in BMS_TOKEN_A, BMS_TOKEN_B)");
    check(tokenA && tokenB, "BMS_TOKEN_A and BMS_TOKEN_B must be set");
    result.grpc_js = require("@grpc/grpc-js/package.json").version;
    result.proto_loader = require("@grpc/proto-loader/package.json").version;
    ERROR_TYPES = loadErrorDetails();
    await walk(address, tokenA, tokenB, result);
    result.ok = true;
  } catch (error) {
    result.error = error instanceof Error ? error.message : String(error);
    const described = describeError(error);
    if (described) result.grpc_error = described;
    if (!(error instanceof Failure) && error instanceof Error) result.stack = error.stack;
  }
  process.stdout.write(`${JSON.stringify(result, null, 2)}\n`);
  process.exitCode = result.ok ? 0 : 1;
}

await main();
