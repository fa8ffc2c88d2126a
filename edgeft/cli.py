"""The ``edgeft`` command line: each sub-command parses its flags into a config and calls one function."""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

from edgeft.errors import EdgeftError


def _csv_list(value: str | None) -> tuple[str, ...] | None:
    return tuple(v.strip() for v in value.split(",") if v.strip()) if value else None


def _labels(value: str | None) -> tuple[str, ...]:
    """Labels from a JSON list file, a text file (one per line) or a comma-separated list."""
    if not value:
        return ()
    path = Path(value)
    if path.is_file():
        text = path.read_text()
        return tuple(json.loads(text)) if path.suffix == ".json" else tuple(l for l in text.splitlines() if l.strip())
    return _csv_list(value) or ()


def _add_export(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("export", help="export a Hugging Face model folder into a training bundle")
    p.add_argument("model", help="Hugging Face model folder (config.json, weights, tokenizer.json)")
    p.add_argument("--out", required=True, help="bundle folder to create (must be new or empty)")
    p.add_argument("--task", default="classification", choices=["classification", "causal-lm", "regression", "multilabel"])
    p.add_argument("--labels", help="label names: a JSON list file, a text file (one per line) or a,b,c")
    p.add_argument("--adapter", default="lora", choices=["lora", "head", "full"])
    p.add_argument("--rank", type=int, default=8, help="LoRA rank (default 8)")
    p.add_argument("--alpha", type=float, default=16.0, help="LoRA alpha (default 16)")
    p.add_argument("--target-modules", help="modules LoRA adapts, comma-separated (default: per architecture)")
    p.add_argument("--trainable-modules", help="modules trained in full, comma-separated (default: the task head)")
    p.add_argument("--optimizer", default="adamw", choices=["adamw", "sgd"])
    p.add_argument("--weight-decay", type=float, default=0.01)
    p.add_argument("--engine", default="portable", choices=["portable", "ort-training"],
                   help="training engine the bundle is for: portable (default: standard ONNX graphs any onnxruntime "
                        ">= 1.19 trains, on any execution provider) or ort-training (onnxruntime-training 1.19.2)")
    p.add_argument("--opset", type=int, default=None, help="ONNX opset (default: 14 for ort-training, 18 portable)")
    p.add_argument("--max-length", type=int, default=128, help="tokens per example on the device (default 128)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--proximal-mu", type=float, default=0.0,
                   help="FedProx: add mu/2 * ||w - w_global||^2 to the training loss (default 0: none)")
    p.add_argument("--pooling", default="auto", choices=["auto", "sentence", "cls"],
                   help="what the task head reads: the model's own sentence pooling (sentence-transformers "
                        "folders), the Hugging Face [CLS] head, or auto (sentence where declared; default)")
    p.set_defaults(func=_run_export)


def _run_export(args: argparse.Namespace) -> int:
    from edgeft.config import AdapterConfig, ExportConfig, OptimizerConfig
    from edgeft.export import export_hf

    config = ExportConfig(
        task=args.task, labels=_labels(args.labels),
        adapter=AdapterConfig(kind=args.adapter, rank=args.rank, alpha=args.alpha,
                              target_modules=_csv_list(args.target_modules),
                              trainable_modules=_csv_list(args.trainable_modules)),
        optimizer=OptimizerConfig(name=args.optimizer, weight_decay=args.weight_decay),
        opset=args.opset, max_length=args.max_length, seed=args.seed, proximal_mu=args.proximal_mu,
        pooling=args.pooling, engine=args.engine)
    bundle = export_hf(args.model, args.out, config)
    m = bundle.manifest
    size = sum(bundle.file(f).stat().st_size for f in m.files) / 2**20
    n_params = sum(math.prod(t.shape) for t in m.trainable)
    print(f"bundle {bundle.path} ({m.engine} engine): {m.task}, {len(m.trainable)} trainable tensors ({n_params:,} parameters), "
          f"{size:.1f} MiB")
    return 0


def _add_train(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("train", help="fine-tune a bundle on local data with ONNX Runtime (no torch)")
    p.add_argument("bundle", help="bundle folder made by `edgeft export`")
    p.add_argument("--data", required=True, help="training data: .csv, .jsonl or .txt")
    p.add_argument("--val", help="validation data file (default: hold out --val-fraction of --data)")
    p.add_argument("--val-fraction", type=float, default=0.1, help="held-out share when --val is absent (0 = none)")
    p.add_argument("--test", help="test data file, evaluated once at the end")
    p.add_argument("--format", choices=["csv", "jsonl", "text"], help="data format (default: from the suffix)")
    p.add_argument("--text-column", default="text")
    p.add_argument("--label-column", default="label")
    p.add_argument("--label-map", help="JSON file mapping raw label values to the bundle's label names")
    p.add_argument("--epochs", type=int, default=1)
    p.add_argument("--max-steps", type=int, help="stop after this many optimizer steps (overrides --epochs)")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--lr", type=float, default=3e-3, help="peak learning rate (default 3e-3)")
    p.add_argument("--warmup-ratio", type=float, default=0.06)
    p.add_argument("--grad-accum", type=int, default=1, help="micro-batches per optimizer step")
    p.add_argument("--early-stopping-patience", type=int, help="epochs without improvement before stopping")
    p.add_argument("--early-stopping-metric", default="loss", help="validation metric to watch (default loss)")
    p.add_argument("--threads", type=int, help="ONNX Runtime intra-op threads (default: all cores)")
    p.add_argument("--provider", help="execution provider: cpu, cuda, coreml, qnn, openvino, ... (default cpu); "
                                      "portable bundles train on any provider the runtime offers")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", required=True, help="folder for update.safetensors, peft/ and metrics.json")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=_run_train)


def _run_train(args: argparse.Namespace) -> int:
    from edgeft.train.session import keep_torch_out

    keep_torch_out()  # a device command: never load torch, even where it is installed
    from edgeft.config import TrainConfig
    from edgeft.data import DataConfig
    from edgeft.run import LocalRun, run_local

    label_map = json.loads(Path(args.label_map).read_text()) if args.label_map else None

    def data(path: str | None) -> DataConfig | None:
        return DataConfig(path, text_column=args.text_column, label_column=args.label_column,
                          format=args.format, label_map=label_map) if path else None

    train = TrainConfig(epochs=args.epochs, max_steps=args.max_steps, batch_size=args.batch_size,
                        learning_rate=args.lr, warmup_ratio=args.warmup_ratio, grad_accum_steps=args.grad_accum,
                        early_stopping_patience=args.early_stopping_patience,
                        early_stopping_metric=args.early_stopping_metric, threads=args.threads, seed=args.seed,
                        provider=args.provider,
                        progress=not args.no_progress)
    run_local(LocalRun(bundle=Path(args.bundle), train=data(args.data), val=data(args.val), test=data(args.test),
                       val_fraction=args.val_fraction, config=train, out=Path(args.out)))
    return 0


def _add_demo(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("demo", help="simulate 4 devices fine-tuning all-MiniLM-L6-v2 on BANKING77 (shipped), deploy "
                                    "int8, predict")
    p.add_argument("--out", default="runs/demo", help="working folder (default runs/demo)")
    p.add_argument("--clients", type=int, default=4)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--partition", default="iid", help="iid, dirichlet:ALPHA or shards:K (default iid)")
    p.add_argument("--baseline", action="store_true", help="also train centrally for comparison (slower)")
    p.add_argument("--local", action="store_true", help="one device instead: plain local fine-tuning")
    p.add_argument("--epochs", type=int, default=1, help="with --local: epochs (default 1)")
    p.add_argument("--threads", type=int, help="with --local: ONNX Runtime threads")
    p.set_defaults(func=_run_demo)


def _run_demo(args: argparse.Namespace) -> int:
    from edgeft.demo import run_demo, run_local_demo

    if args.local:
        run_local_demo(Path(args.out), epochs=args.epochs, threads=args.threads)
    else:
        run_demo(Path(args.out), clients=args.clients, rounds=args.rounds, partition=args.partition,
                 baseline=args.baseline)
    return 0


def _add_simulate(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("simulate", help="a federated fleet on this machine: a real coordinator and N agent processes")
    p.add_argument("--clients", type=int, default=4, help="simulated devices (default 4)")
    p.add_argument("--rounds", type=int, default=3, help="federated rounds (default 3)")
    p.add_argument("--partition", default="iid",
                   help="iid, dirichlet:ALPHA (label skew, e.g. dirichlet:0.5) or shards:K (default iid)")
    p.add_argument("--seed", type=int, default=0, help="partition seed (default 0)")
    p.add_argument("--data", help="training data split among the clients (default: BANKING77, shipped)")
    p.add_argument("--test-data", help="held-out data the coordinator evaluates on (default: BANKING77 test)")
    p.add_argument("--text-column", default=None)
    p.add_argument("--label-column", default=None)
    p.add_argument("--model", help="Hugging Face model folder (default: all-MiniLM-L6-v2, shipped)")
    p.add_argument("--bundle", help="an exported bundle instead of --model")
    p.add_argument("--fraction", type=float, default=1.0, help="fraction of clients per round (default 1)")
    p.add_argument("--epochs", type=int, default=1, help="local epochs per round (default 1)")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--concurrency", type=int, help="agents training at once (default: one per core)")
    p.add_argument("--threads", type=int, default=1, help="ONNX Runtime threads per agent (default 1)")
    p.add_argument("--no-baseline", dest="baseline", action="store_false",
                   help="skip the centralised baseline (same passes over all the data)")
    p.add_argument("--head-init", default="auto", choices=["auto", "class_means", "fedcof", "none"],
                   help="round 0, the statistics round: build the head from the clients' class statistics before "
                        "training (default auto: class_means for a sentence-transformers model; none: random head)")
    p.add_argument("--out", default="runs/simulate", help="output folder (default runs/simulate)")
    p.add_argument("--overwrite", action="store_true", help="replace a previous simulation in --out")
    p.add_argument("--secure-aggregation", action="store_true",
                   help="the coordinator learns only each round's sum (default [job.secure_aggregation] settings)")
    p.add_argument("--client-ranks", metavar="R1,R2,...",
                   help="mixed LoRA ranks: each client's largest rank, cycled over the fleet (e.g. 8,4: every other "
                        "client trains rank 4); the smaller ranks are exported from --model")
    p.add_argument("--engines", metavar="E1,E2",
                   help="training engines the job serves, preferred first (e.g. ort-training,portable): --model is "
                        "exported for each; each client trains the first its runtime runs")
    p.add_argument("--client-pythons", metavar="PY1,PY2,...",
                   help="the Python each client's agent runs with, cycled over the fleet: device virtualenvs with "
                        "edgeft installed (scripts/device_venv.py), e.g. one with the plain onnxruntime")
    p.set_defaults(func=_run_simulate)


def _ranks(text: str | None) -> tuple[int, ...]:
    """``--client-ranks 8,4`` as (8, 4)."""
    try:
        return tuple(int(r) for r in text.split(",")) if text else ()
    except ValueError as exc:
        raise ConfigError(f"invalid --client-ranks {text!r}: comma-separated whole numbers, e.g. 8,4") from exc


def _run_simulate(args: argparse.Namespace) -> int:
    from edgeft.config import TrainConfig
    from edgeft.data import DataConfig
    from edgeft.datasets import BANKING77_DIR
    from edgeft.simulation import SimulationConfig, run_simulation

    shipped = args.data is None
    text = args.text_column or "text"
    label = args.label_column or ("category" if shipped else "label")
    train = DataConfig(args.data or BANKING77_DIR / "train.csv", text_column=text, label_column=label)
    test_path = args.test_data or (BANKING77_DIR / "test.csv" if shipped else None)
    test = DataConfig(test_path, text_column=text, label_column=label) if test_path else None
    model = None
    if args.bundle is None:
        from edgeft.demo import minilm_dir

        model = Path(args.model) if args.model else minilm_dir()
    export = None
    if shipped and args.bundle is None:
        from edgeft.config import ExportConfig
        from edgeft.datasets import banking77_labels

        export = ExportConfig(labels=tuple(banking77_labels()))
    summary = run_simulation(SimulationConfig(
        out=Path(args.out), train=train, test=test, model=model, bundle=Path(args.bundle) if args.bundle else None,
        export=export, clients=args.clients, rounds=args.rounds, partition=args.partition, seed=args.seed,
        fraction=args.fraction, concurrency=args.concurrency, threads=args.threads, baseline=args.baseline,
        overwrite=args.overwrite, secure_aggregation={} if args.secure_aggregation else None,
        head_init=args.head_init, client_ranks=_ranks(args.client_ranks), engines=_csv_list(args.engines) or (),
        client_pythons=tuple(Path(p) for p in _csv_list(args.client_pythons) or ()),
        local=TrainConfig(epochs=args.epochs, batch_size=args.batch_size, learning_rate=args.lr, progress=False)))
    last = summary["history"]["rounds"][-1].get("evaluation") or {}
    print(f"simulation done in {summary['seconds']:.0f} s; final test accuracy {last.get('accuracy', float('nan')):.1%}; "
          f"report: {Path(args.out) / 'report.md'}")
    return 0


def _add_server(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("server", help="run the federated coordinator (gRPC) for the jobs in a TOML file; "
                                      "`edgeft server token ...` manages device enrolment tokens")
    p.add_argument("--config", help="TOML file with [server] and [[job]] tables (see README)")
    p.add_argument("--address", help="listen address, overrides the file (e.g. 0.0.0.0:50051)")
    p.add_argument("--insecure", action="store_true", default=None,
                   help="serve plaintext instead of TLS (development on a trusted network only; logged loudly)")
    p.set_defaults(func=_run_server)
    tokens = p.add_subparsers(dest="server_command", metavar="token").add_parser(
        "token", help="device enrolment tokens: create, list, revoke").add_subparsers(dest="token_command",
                                                                                     required=True)
    create = tokens.add_parser("create", help="make a token for a job and print it (once; only its hash is kept)")
    create.add_argument("--config", required=True, help="the coordinator's TOML file")
    create.add_argument("--job", required=True, help="the job the token enrols devices in")
    create.add_argument("--expires-in", help="lifetime, e.g. 30d, 12h, 90m or seconds (default: until revoked)")
    create.add_argument("--note", default="", help="a note kept with the token (e.g. who it is for)")
    create.set_defaults(func=_run_token_create)
    listing = tokens.add_parser("list", help="show the tokens (ids, jobs, status; never the tokens)")
    listing.add_argument("--config", required=True, help="the coordinator's TOML file")
    listing.add_argument("--job", help="only this job's tokens")
    listing.set_defaults(func=_run_token_list)
    revoke = tokens.add_parser("revoke", help="revoke tokens by id: calls made with them are refused at once")
    revoke.add_argument("--config", required=True, help="the coordinator's TOML file")
    revoke.add_argument("ids", nargs="+", metavar="ID", help="token ids (`edgeft server token list`)")
    revoke.set_defaults(func=_run_token_revoke)


def _run_server(args: argparse.Namespace) -> int:
    import logging

    from edgeft.server.config import load_server_config
    from edgeft.server.servicer import serve

    if not args.config:
        raise EdgeftError("give --config jobs.toml")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    serve(load_server_config(args.config, address=args.address, insecure=args.insecure))
    return 0


def _token_store(config_path: str):  # noqa: ANN202
    from edgeft.server.auth import TokenStore
    from edgeft.server.config import load_server_config
    from edgeft.server.store import open_database

    config = load_server_config(config_path)
    return TokenStore(open_database(config.state_dir / "state.db"), [job.id for job in config.jobs])


def _when(seconds: float | None) -> str:
    import time

    return "-" if seconds is None else time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(seconds))


def _run_token_create(args: argparse.Namespace) -> int:
    from edgeft.server.auth import parse_duration

    store = _token_store(args.config)
    expires = parse_duration(args.expires_in) if args.expires_in else None
    info, token = store.create(args.job, expires, args.note)
    print(f"token {info.id} for job {info.job_id}, expires {_when(info.expires_at)} UTC; it is shown only now "
          "(the coordinator keeps its hash). Give it to devices as --token-file FILE or EDGEFT_TOKEN.",
          file=sys.stderr)
    print(token)
    return 0


def _run_token_list(args: argparse.Namespace) -> int:
    rows = _token_store(args.config).list(args.job)
    print(f"{'id':<17} {'job':<20} {'status':<8} {'created (UTC)':<20} {'expires (UTC)':<20} note")
    for t in rows:
        print(f"{t.id:<17} {t.job_id:<20} {t.status():<8} {_when(t.created_at):<20} {_when(t.expires_at):<20} {t.note}")
    return 0


def _run_token_revoke(args: argparse.Namespace) -> int:
    store = _token_store(args.config)
    for token_id in args.ids:
        info = store.revoke(token_id)
        print(f"token {info.id} (job {info.job_id}) revoked at {_when(info.revoked_at)} UTC")
    return 0


def _add_client(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("client", help="run a device agent: train each round on local data (no torch)")
    p.add_argument("--server", required=True, help="coordinator address HOST:PORT")
    p.add_argument("--data", required=True, help="the device's data: .csv, .jsonl or .txt")
    p.add_argument("--text-column", help="override the job's text column")
    p.add_argument("--label-column", help="override the job's label column")
    p.add_argument("--format", choices=["csv", "jsonl", "text"], help="override the file format")
    p.add_argument("--cache-dir", default=".edgeft-device", help="bundle cache and device id (default .edgeft-device)")
    p.add_argument("--threads", type=int, help="ONNX Runtime intra-op threads (default: all cores)")
    p.add_argument("--give-up-after", type=float, default=600.0,
                   help="seconds the coordinator may stay unreachable before the agent stops (default 600)")
    p.add_argument("--max-lora-rank", type=int,
                   help="train at most this LoRA rank (a device with little memory): the coordinator serves the "
                        "largest rank of the job up to it ([job] device_ranks); default: the job's rank")
    p.add_argument("--provider", help="execution provider to train on: cpu, cuda, coreml, qnn, openvino, ... "
                                      "(default cpu); portable bundles train on any provider the runtime offers")
    p.add_argument("--training-slots", metavar="DIR:K",
                   help="share this machine with other agents: at most K of the agents given DIR train at once")
    p.add_argument("--token-file", help="file holding the job's enrolment token (default: $EDGEFT_TOKEN)")
    p.add_argument("--ca-cert", help="CA certificate that signed the coordinator's (default: the system's CAs)")
    p.add_argument("--client-cert", help="this device's certificate, for a coordinator that requires mutual TLS")
    p.add_argument("--client-key", help="the key of --client-cert")
    p.add_argument("--server-name", help="name to expect in the coordinator's certificate (default: the host in "
                                         "--server)")
    p.add_argument("--insecure", action="store_true",
                   help="plaintext, no TLS (only against a development coordinator with insecure = true)")
    p.add_argument("--max-message-bytes", type=int, default=8 << 20,
                   help="largest message to accept or send (default 8 MiB)")
    p.set_defaults(func=_run_client)


def _training_slots(value: str | None) -> tuple[Path, int] | None:
    if not value:
        return None
    folder, _, count = value.rpartition(":")
    if not folder or not count.isdigit() or int(count) < 1:
        raise EdgeftError(f"invalid --training-slots {value!r}: expected DIR:K with K >= 1, e.g. /tmp/slots:2")
    return Path(folder), int(count)


def _run_client(args: argparse.Namespace) -> int:
    from edgeft.train.session import keep_torch_out

    keep_torch_out()
    import logging

    from edgeft.client.agent import Agent, AgentConfig
    from edgeft.client.transport import Transport, read_token

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    if not Path(args.data).is_file():
        raise EdgeftError(f"data file {args.data} does not exist")
    transport = Transport(token=read_token(args.token_file), insecure=args.insecure, ca_cert=args.ca_cert,
                          client_cert=args.client_cert, client_key=args.client_key, server_name=args.server_name,
                          max_message_bytes=args.max_message_bytes)
    agent = Agent(AgentConfig(server=args.server, data=Path(args.data), cache_dir=Path(args.cache_dir),
                              text_column=args.text_column, label_column=args.label_column, format=args.format,
                              threads=args.threads, give_up_after_s=args.give_up_after,
                              max_lora_rank=args.max_lora_rank, provider=args.provider,
                              training_slots=_training_slots(args.training_slots), transport=transport))
    print(f"done: {agent.run()}", flush=True)
    return 0


def _add_certs(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("certs", help="make a development CA and TLS certificates for a coordinator and devices "
                                     "(local use, not production)")
    p.add_argument("--out", default="certs", help="folder to write (default certs); a CA already there is reused")
    p.add_argument("--host", action="append", dest="hosts",
                   help="a name or IP address of the coordinator, repeatable (default: localhost, 127.0.0.1, ::1)")
    p.add_argument("--client", action="append", dest="clients",
                   help="a device certificate to make (NAME.pem, NAME.key), repeatable (default: device)")
    p.add_argument("--days", type=int, default=365, help="validity in days (default 365)")
    p.set_defaults(func=_run_certs)


def _run_certs(args: argparse.Namespace) -> int:
    try:
        from edgeft.server.certs import CertsConfig, make_certs
        import cryptography  # noqa: F401
    except ImportError as exc:
        raise EdgeftError("edgeft certs needs the `cryptography` package: pip install 'edgeft[server]'") from exc
    config = CertsConfig(out=Path(args.out), clients=tuple(args.clients or ("device",)), days=args.days,
                         **({"hosts": tuple(args.hosts)} if args.hosts else {}))
    files = make_certs(config)
    print(f"wrote a development CA and certificates to {config.out} (hosts: {', '.join(config.hosts)}):")
    for role, path in files.items():
        print(f"  {role:<16} {path}")
    client = config.clients[0]
    files = {role: path.resolve() for role, path in files.items()}
    print(f"""
coordinator (jobs.toml):
  [server.tls]
  cert = "{files['server']}"
  key = "{files['server_key']}"
  client_ca = "{files['ca']}"     # optional: mutual TLS
device:
  edgeft client --server {config.hosts[0]}:50051 --ca-cert {files['ca']}"""
          + f" --client-cert {files[client]} --client-key {files[client + '_key']}"
          + " --token-file TOKEN_FILE ...")
    return 0


def _add_deploy(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("deploy", help="merge a trained adapter, export an inference model, quantise and measure it")
    p.add_argument("--model", required=True, help="the base Hugging Face model folder the bundle was exported from")
    p.add_argument("--adapter", help="an adapter folder from `edgeft train` (or its update.safetensors)")
    p.add_argument("--bundle", help="the bundle the --adapter was trained from")
    p.add_argument("--state", help="instead of --adapter: a coordinator's state folder (its state_dir)")
    p.add_argument("--job", help="with --state: the job whose global adapter to deploy")
    p.add_argument("--round", type=int, help="with --state: the round (default: the latest)")
    p.add_argument("--out", required=True, help="deployment package folder to write")
    p.add_argument("--mode", default="int8", choices=["none", "fp16", "int8", "int8-static", "int4"],
                   help="quantisation (default int8; int8-static: QDQ calibrated on --calibration-data, for NPUs; "
                        "int4: weight-only MatMulNBits)")
    p.add_argument("--eval-data", help="held-out data for the report's accuracy and latency")
    p.add_argument("--calibration-data", help="int8-static: a sample of the task's data to calibrate on "
                                              "(default: --eval-data)")
    p.add_argument("--text-column", default="text")
    p.add_argument("--label-column", default="label")
    p.add_argument("--fixed-shape", metavar="BATCHxSEQUENCE",
                   help="freeze the input shape, e.g. 1x128 (what NPU execution providers want)")
    p.add_argument("--accuracy-budget", type=float, default=1.0,
                   help="accuracy points the quantised model may lose against fp32 (default 1)")
    p.add_argument("--threads", type=int, default=2)
    p.set_defaults(func=_run_deploy)


def _fixed_shape(value: str | None) -> tuple[int, int] | None:
    if not value:
        return None
    try:
        batch, sequence = (int(v) for v in value.lower().split("x"))
    except ValueError:
        raise EdgeftError(f"invalid --fixed-shape {value!r}: expected BATCHxSEQUENCE, e.g. 1x128") from None
    return batch, sequence


def _run_deploy(args: argparse.Namespace) -> int:
    from edgeft.data import DataConfig
    from edgeft.deploy import DeployConfig, deploy

    def data(path: str | None) -> DataConfig | None:
        return DataConfig(path, text_column=args.text_column, label_column=args.label_column) if path else None

    def path(value: str | None) -> Path | None:
        return Path(value) if value else None

    report = deploy(DeployConfig(model_dir=Path(args.model), out=Path(args.out), bundle=path(args.bundle),
                                 adapter=path(args.adapter), state_dir=path(args.state), job=args.job,
                                 round=args.round, mode=args.mode, eval_data=data(args.eval_data),
                                 calibration_data=data(args.calibration_data),
                                 fixed_shape=_fixed_shape(args.fixed_shape),
                                 accuracy_budget=args.accuracy_budget, threads=args.threads))
    print((Path(args.out) / "report.md").read_text())
    print(f"package written to {args.out} (size ratio {report['size_ratio']})")
    return 0


def _add_predict(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("predict", help="run a deployment package on texts (onnxruntime only, no torch)")
    p.add_argument("texts", nargs="*", help="texts to classify")
    p.add_argument("--model", required=True, help="deployment package folder from `edgeft deploy`")
    p.add_argument("--input", help="CSV/JSONL file of texts instead of arguments")
    p.add_argument("--output", help="CSV file to write (input columns + label, score); default: print")
    p.add_argument("--text-column", default="text")
    p.add_argument("--provider", help="execution provider (cpu, cuda, qnn, openvino, coreml); default cpu")
    p.set_defaults(func=_run_predict)


def _run_predict(args: argparse.Namespace) -> int:
    from edgeft.train.session import keep_torch_out

    keep_torch_out()
    import csv

    from edgeft.data import DataConfig, read_records
    from edgeft.predict import Predictor

    predictor = Predictor(args.model, provider=args.provider)
    print(f"execution provider: {predictor.provider}", file=sys.stderr)
    if args.input:
        rows = read_records(DataConfig(args.input, text_column=args.text_column))
        if rows and args.text_column not in rows[0]:
            raise EdgeftError(f"{args.input} has no column {args.text_column!r}; pass --text-column")
        texts = [str(r[args.text_column]) for r in rows]
    else:
        if not args.texts:
            raise EdgeftError("give texts to classify, or --input FILE")
        rows, texts = [{"text": t} for t in args.texts], list(args.texts)
    predictions = predictor.predict(texts)
    if args.output:
        with open(args.output, "w", newline="") as fh:
            writer = csv.DictWriter(fh, fieldnames=[*rows[0].keys(), "label", "score"])
            writer.writeheader()
            for row, (label, score) in zip(rows, predictions):
                writer.writerow({**row, "label": label, "score": f"{score:.4f}"})
        print(f"{len(predictions)} predictions written to {args.output}")
    else:
        for text, (label, score) in zip(texts, predictions):
            print(f"{label}\t{score:.3f}\t{text}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="edgeft", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    _add_export(sub)
    _add_train(sub)
    _add_demo(sub)
    _add_server(sub)
    _add_client(sub)
    _add_certs(sub)
    _add_simulate(sub)
    _add_deploy(sub)
    _add_predict(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args))
    except EdgeftError as exc:
        print(f"edgeft {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
