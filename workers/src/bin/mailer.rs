//! Renders and sends `notify.email` messages over SMTP.

use souk_shared::config::exit_on_error;
use souk_workers::{
    mailer::{Mailer, MailerConfig},
    process::Process,
};

#[tokio::main]
async fn main() {
    let process = Process::start("mailer").await;
    let config = exit_on_error(MailerConfig::from_env(&process.env));
    process.consume(Mailer::new(&config)).await;
}
